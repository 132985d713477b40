"""Mixing real and synthetic training data: a weighted concatenation and a ratio-keeping sampler.

Items follow the classifier contract (``image`` uint8 1 x H x W, ``labels`` float32 C with NaN
for "not labelled"); the classifier loop makes ``x = image / 127.5 - 1`` in [-1, 1]. Here a
``weight`` is added: 1 for real items, ``xi`` (XRAY-GAN's weight of pseudo-labelled samples) for
synthetic ones, which the masked BCE uses as a per-sample loss weight.

Index layout of :class:`MixedDataset`: real items first (``0 .. n_real - 1``), then synthetic
(``n_real .. n_real + n_synthetic - 1``); :class:`MixedBatchSampler` yields indices in that layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)


def _label_matrix(ds: Any) -> np.ndarray | None:
    method = getattr(ds, "label_matrix", None)
    labels = method() if callable(method) else getattr(ds, "labels", None)
    if labels is None:
        return None
    arr = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.float32)
    return arr if arr.ndim == 2 and len(arr) == len(ds) else None


class MixedDataset(Dataset):
    """Real and synthetic datasets back to back, synthetic items weighted by ``xi``.

    Args:
        real: real items.
        synthetic: synthetic items (e.g. :class:`augment.data.synthetic.SyntheticDataset`).
        xi: loss weight of a synthetic sample relative to a real one (>= 0). An item that
            already carries a ``weight`` keeps it, multiplied by ``xi`` when synthetic.

    Raises:
        ValueError: negative ``xi``, different class lists, or first items whose image shape or
            label length differ.
    """

    def __init__(self, real: Dataset, synthetic: Dataset, *, xi: float) -> None:
        if not xi >= 0:
            raise ValueError(f"xi must be >= 0, got {xi}")
        self.real, self.synthetic, self.xi = real, synthetic, float(xi)
        self.n_real, self.n_synthetic = len(real), len(synthetic)
        rc, sc = getattr(real, "classes", None), getattr(synthetic, "classes", None)
        if rc is not None and sc is not None and list(rc) != list(sc):
            raise ValueError(f"real classes {list(rc)} differ from synthetic classes {list(sc)}; "
                             "load the synthetic set with classes= the real ones")
        self.classes = list(rc if rc is not None else sc) if (rc is not None or sc is not None) else None
        if self.n_real and self.n_synthetic:
            a, b = real[0], synthetic[0]
            ia, ib = torch.as_tensor(a["image"]), torch.as_tensor(b["image"])
            if ia.shape != ib.shape:
                raise ValueError(f"real images are {tuple(ia.shape)} but synthetic ones are {tuple(ib.shape)}; "
                                 "use the same image size")
            if len(a["labels"]) != len(b["labels"]):
                raise ValueError(f"real items have {len(a['labels'])} labels, synthetic ones {len(b['labels'])}")

    def __len__(self) -> int:
        return self.n_real + self.n_synthetic

    def is_synthetic(self, i: int) -> bool:
        """Whether index ``i`` is a synthetic item."""
        return i >= self.n_real

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        if i < self.n_real:
            item, scale = dict(self.real[i]), 1.0
        else:
            item, scale = dict(self.synthetic[i - self.n_real]), self.xi
        base = float(item.get("weight", 1.0))
        item["weight"] = torch.tensor(base * scale, dtype=torch.float32)
        return item

    def label_matrix(self) -> np.ndarray | None:
        """Concatenated N x C labels when both parts expose theirs, else None."""
        a, b = _label_matrix(self.real), _label_matrix(self.synthetic)
        if a is None or b is None:
            return None
        return np.concatenate([a, b])


class MixedBatchSampler(Sampler[list[int]]):
    """Batches with a fixed synthetic:real ratio; every real image at least once per epoch.

    Each batch holds ``k_syn = round(batch_size * r / (1 + r))`` synthetic indices and
    ``k_real = batch_size - k_syn`` real ones (``r`` = ``ratio``, synthetic per real). Real and
    synthetic indices are each drawn as a stream of random permutations, so within a stream no
    index repeats before all have been used. By default an epoch is ``ceil(n_real / k_real)``
    batches: every real image appears once, and the last batch is topped up from the next real
    permutation (at most ``k_real - 1`` repeats) so that every batch keeps the ratio exactly.

    Args:
        n_real: number of real items (indices ``0 .. n_real - 1``).
        n_synthetic: number of synthetic items (indices ``n_real ..``).
        batch_size: items per batch.
        ratio: synthetic:real ratio ``r >= 0``.
        generator: source of all randomness; each ``iter()`` continues from its state.
        num_batches: batches per epoch (default as above).
        real_weights: optional per-real-item sampling weights (class-balanced sampling of the real
            part, e.g. ``cxrbase.balanced_weights``): real indices are then drawn
            with replacement in proportion to them; the synthetic stream and the ratio are unchanged.
        synthetic_weights: the same for the synthetic slot (e.g. class-balanced repeats of real
            positives in the ``oversample`` arm).
        slot_generator: a separate source for the synthetic slot's draws. With it, the real
            indices of every batch depend on ``generator`` alone: two samplers with the same
            ``generator`` seed give the same real images whatever fills the slot (paired arms).

    Raises:
        ValueError: no real items, a ratio that leaves no real slot, or synthetic slots without
            synthetic items.
    """

    def __init__(
        self,
        n_real: int,
        n_synthetic: int,
        *,
        batch_size: int,
        ratio: float,
        generator: torch.Generator,
        num_batches: int | None = None,
        real_weights: Sequence[float] | None = None,
        synthetic_weights: Sequence[float] | None = None,
        slot_generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not ratio >= 0 or math.isinf(ratio):
            raise ValueError(f"ratio (synthetic:real) must be a finite number >= 0, got {ratio}")
        if n_real < 1:
            raise ValueError("MixedBatchSampler needs at least one real item")
        self.n_real, self.n_synthetic = int(n_real), int(n_synthetic)
        self.batch_size, self.ratio, self.generator = int(batch_size), float(ratio), generator
        self.n_syn_per_batch = int(round(batch_size * ratio / (1.0 + ratio)))
        self.n_real_per_batch = batch_size - self.n_syn_per_batch
        self.slot_generator = slot_generator if slot_generator is not None else generator
        if self.n_real_per_batch < 1:
            raise ValueError(f"ratio {ratio} leaves no real image in a batch of {batch_size}; "
                             "lower the ratio or raise the batch size")
        if self.n_syn_per_batch and self.n_synthetic < 1:
            raise ValueError(f"ratio {ratio} asks for {self.n_syn_per_batch} synthetic images per batch "
                             "but there are none")
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.num_batches = num_batches if num_batches is not None else math.ceil(self.n_real / self.n_real_per_batch)
        self.real_weights = None
        if real_weights is not None:
            w = torch.as_tensor(list(real_weights), dtype=torch.double)
            if w.shape != (self.n_real,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(f"real_weights must be {self.n_real} finite non-negative numbers with a positive sum")
            self.real_weights = w
        self.synthetic_weights = None
        if synthetic_weights is not None:
            w = torch.as_tensor(list(synthetic_weights), dtype=torch.double)
            if w.shape != (self.n_synthetic,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(f"synthetic_weights must be {self.n_synthetic} finite non-negative numbers with a positive sum")
            self.synthetic_weights = w

    def __len__(self) -> int:
        return self.num_batches

    @staticmethod
    def _stream(n: int, offset: int, gen: torch.Generator) -> Iterator[int]:
        while True:
            for i in torch.randperm(n, generator=gen).tolist():
                yield offset + i

    @staticmethod
    def _weighted(w: torch.Tensor, offset: int, gen: torch.Generator) -> Iterator[int]:
        while True:
            for i in torch.multinomial(w, len(w), replacement=True, generator=gen).tolist():
                yield offset + i

    def __iter__(self) -> Iterator[list[int]]:
        g, sg = self.generator, self.slot_generator
        real = self._stream(self.n_real, 0, g) if self.real_weights is None else self._weighted(self.real_weights, 0, g)
        if not self.n_syn_per_batch:
            syn: Iterator[int] = iter(())
        elif self.synthetic_weights is None:
            syn = self._stream(self.n_synthetic, self.n_real, sg)
        else:
            syn = self._weighted(self.synthetic_weights, self.n_real, sg)
        for _ in range(self.num_batches):
            batch = [next(real) for _ in range(self.n_real_per_batch)]
            batch += [next(syn) for _ in range(self.n_syn_per_batch)]
            yield batch


def synthetic_view(ds: Any, classes: Sequence[str] | str | None, threshold: float | None) -> Any:
    """The same synthetic files relabelled with pseudo-label threshold ``threshold`` over ``classes``.

    ``ds`` must offer ``relabel(threshold, classes)`` (as
    :class:`augment.data.synthetic.SyntheticDataset` does); images are not re-read or changed.
    """
    relabel = getattr(ds, "relabel", None)
    if not callable(relabel):
        raise TypeError(f"{type(ds).__name__} cannot be relabelled (no relabel method)")
    return relabel(threshold, classes)


__all__ = ["MixedBatchSampler", "MixedDataset", "synthetic_view"]
