"""The in-memory form of a data source and its torch view.

Every source (phantom, nih, folder, chexpert, medmnist) produces a :class:`DataTable`: uint8
images N x H x W (bright = dense), multi-hot float32 labels over ``labels.VOCABULARY`` (1 / 0 /
NaN = not labelled by this source), patient ids and a train/val/test split by patient; lesion
masks per finding, anatomy masks and paired healthy renders where the source has them.
:class:`XrayDataset` is the torch Dataset over a table: one contract for every source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from augment.data.labels import NO_FINDING, VOCABULARY

SPLITS = ("train", "val", "test")


@dataclass
class DataTable:
    """A whole data source at one image size.

    Attributes:
        source: source name (``phantom``, ``folder``, ...).
        images: N x H x W uint8 (possibly a read-only memory map).
        labels: N x len(VOCABULARY) float32, columns in ``VOCABULARY`` order.
        patient_ids: N patient ids (str).
        splits: N split names in ``SPLITS``.
        files: N image identifiers (relative paths for file sources).
        lesion_masks: finding -> N x H x W uint8 {0, 1}; ``lesion_known[finding]`` (N bool) says
            which rows have ground truth for it.
        anatomy: structure (``lungs``, ``heart``) -> N x H x W uint8 {0, 1}; ``anatomy_known`` likewise.
        healthy: N x H x W uint8 paired healthy render (phantom only), else None.
        fingerprint: content key of the table (source, root, size, file list / generator params).
    """

    source: str
    images: np.ndarray
    labels: np.ndarray
    patient_ids: np.ndarray
    splits: np.ndarray
    files: np.ndarray
    lesion_masks: dict[str, np.ndarray] = field(default_factory=dict)
    lesion_known: dict[str, np.ndarray] = field(default_factory=dict)
    anatomy: dict[str, np.ndarray] = field(default_factory=dict)
    anatomy_known: dict[str, np.ndarray] = field(default_factory=dict)
    healthy: np.ndarray | None = None
    fingerprint: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def column(self, name: str) -> np.ndarray:
        """Label column of a class (N float32, NaN where unlabelled)."""
        return self.labels[:, VOCABULARY.index(name)]

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices of a split (all rows for None)."""
        if split is None:
            return np.arange(len(self))
        return np.flatnonzero(self.splits == split)

    def labelled_classes(self) -> list[str]:
        """Classes with at least one positive label, in vocabulary order."""
        with np.errstate(invalid="ignore"):
            return [c for i, c in enumerate(VOCABULARY) if np.nansum(self.labels[:, i]) > 0]

    def counts(self, classes: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
        """Positive counts per class and split, plus ``images`` per split."""
        classes = list(classes) if classes else self.labelled_classes()
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            idx = self.indices(split)
            row = {"images": int(len(idx))}
            for c in classes:
                col = self.labels[idx, VOCABULARY.index(c)]
                row[c] = int(np.nansum(col == 1))
            out[split] = row
        return out


def fingerprint(*parts: object) -> str:
    """Stable short hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def select_labels(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Columns of ``classes`` from vocabulary-ordered labels."""
    return labels[:, [VOCABULARY.index(c) for c in classes]]


class XrayDataset(Dataset):
    """Torch view over rows of a :class:`DataTable`.

    Items are dicts: ``image`` uint8 1 x H x W, ``labels`` float32 over ``classes`` (NaN kept),
    ``index`` (row in the table), ``patient_id``; with ``with_masks`` also ``masks`` uint8
    C x H x W (zeros where a class has no mask), ``lungs`` uint8 1 x H x W and ``healthy``
    uint8 1 x H x W when the table has them.
    """

    def __init__(
        self,
        table: DataTable,
        indices: Sequence[int] | np.ndarray | None = None,
        classes: Sequence[str] = (),
        *,
        with_masks: bool = False,
    ) -> None:
        self.table = table
        self.indices = np.asarray(table.indices() if indices is None else indices, dtype=np.int64)
        self.classes = list(classes) or table.labelled_classes()
        self.with_masks = with_masks
        self._labels = select_labels(table.labels, self.classes).astype(np.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def label_matrix(self) -> np.ndarray:
        """len(self) x C labels (NaN kept), e.g. for class-balanced sampling."""
        return self._labels[self.indices]

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        t = self.table
        item = {
            "image": torch.from_numpy(np.array(t.images[row], dtype=np.uint8)[None]),
            "labels": torch.from_numpy(self._labels[row].copy()),
            "index": row,
            "patient_id": str(t.patient_ids[row]),
        }
        if self.with_masks:
            h, w = t.images.shape[1:]
            masks = np.zeros((len(self.classes), h, w), dtype=np.uint8)
            for k, c in enumerate(self.classes):
                if c in t.lesion_masks and c != NO_FINDING:
                    masks[k] = t.lesion_masks[c][row]
            item["masks"] = torch.from_numpy(masks)
            if "lungs" in t.anatomy:
                item["lungs"] = torch.from_numpy(np.array(t.anatomy["lungs"][row], dtype=np.uint8)[None])
            if t.healthy is not None:
                item["healthy"] = torch.from_numpy(np.array(t.healthy[row], dtype=np.uint8)[None])
        return item
