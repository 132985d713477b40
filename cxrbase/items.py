"""The dataset item contract, its batching, and the uint8 <-> [-1, 1] image mapping.

An item is a dict with

- ``"image"``: uint8 tensor 1 x H x W (0..255); H x W is accepted and gains the channel dim when
  collated. A floating-point image is taken to be ``x`` already, i.e. in [-1, 1].
- ``"labels"``: float32 tensor of length C, entries 1 / 0 / NaN (NaN = not labelled).
- ``"weight"`` (optional): float32 scalar loss weight, 1 when absent (synthetic samples carry
  XRAY-GAN's xi here).

Other keys (masks, probabilities, ids) are ignored by :func:`collate`. On the device, images become
``x = image / 127.5 - 1``: float in [-1, 1], shape B x 1 x H x W (:func:`to_x`); :func:`to_uint8`
maps ``x`` back to uint8 B x H x W for writing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CONTRACT = (
    "dataset items must be dicts with 'image' (uint8 1 x H x W), 'labels' (float32 C, NaN = not labelled) "
    "and optionally 'weight' (float32 scalar)"
)


def collate(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items into ``{"image": B x 1 x H x W uint8, "labels": B x C float32, "weight": B float32}``.

    Items without ``"weight"`` get 1.0, so real and synthetic items can share a batch. H x W images
    get the channel dim. Other keys are dropped.

    Raises:
        ValueError: ``items`` is empty.
        KeyError: an item lacks ``image`` or ``labels`` (the message states the contract).
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    try:
        images = torch.stack([torch.as_tensor(it["image"]) for it in items])
        labels = torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items])
    except KeyError as exc:
        raise KeyError(f"{CONTRACT}; missing {exc}") from None
    weights = torch.tensor([float(it.get("weight", 1.0)) for it in items], dtype=torch.float32)
    if images.ndim == 3:  # items gave H x W images
        images = images[:, None]
    return {"image": images, "labels": labels, "weight": weights}


def to_x(
    image: torch.Tensor, device: torch.device | str | None = None, *, channels_last: bool = False
) -> torch.Tensor:
    """Map a uint8 image batch (0..255) to float ``x`` in [-1, 1]: ``image.float() / 127.5 - 1``.

    With ``device`` the uint8 tensor is moved first (4x fewer bytes over the bus), then converted.
    A floating-point input is taken to be ``x`` already and only cast with ``.float()``.

    Args:
        image: uint8 (or float ``x``) B x 1 x H x W.
        device: where to put the result; None leaves it where it is.
        channels_last: return a channels_last-contiguous tensor.
    """
    if device is not None:
        image = image.to(device, non_blocking=True)
    if image.dtype == torch.uint8:
        # In place on the fresh float copy; bit-identical to ``image.float() / 127.5 - 1.0``.
        x = image.float().div_(127.5).sub_(1.0)
    else:
        x = image.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Map float ``x`` in [-1, 1], B x 1 x H x W, to a uint8 B x H x W array (clamped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()[:, 0]


def dataset_labels(dataset: Any) -> np.ndarray:
    """The N x C float32 label matrix of a dataset (1 / 0 / NaN, NaN kept).

    In order of preference: a ``label_matrix()`` method, a ``labels`` attribute (array-like N x C
    with ``len(dataset)`` rows), otherwise every item's ``"labels"`` (which decodes every image).
    """
    method = getattr(dataset, "label_matrix", None)
    labels = method() if callable(method) else getattr(dataset, "labels", None)
    if labels is not None and not callable(labels):
        arr = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.float32)
        if arr.ndim == 2 and len(arr) == len(dataset):
            return arr
    log.info("dataset has no labels attribute: reading all %d items to get labels", len(dataset))
    return np.stack([np.asarray(dataset[i]["labels"], dtype=np.float32) for i in range(len(dataset))])


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample float64 sampling weights that give each class, and the no-positive group, equal mass.

    A sample's weight is ``1 / n_pos(c)`` for its rarest positive class ``c``; samples with no
    positive label share ``1 / n_none``. NaN labels count as not positive.

    Args:
        labels: N x C, 1 / 0 / NaN.

    Returns:
        N float64 weights.
    """
    labels = np.asarray(labels, dtype=np.float32)
    pos = np.nan_to_num(labels, nan=0.0) == 1
    n_pos = pos.sum(0).astype(np.float64)
    inv = np.where(n_pos > 0, 1.0 / np.maximum(n_pos, 1), 0.0)
    w = (pos * inv).max(1) if labels.shape[1] else np.zeros(len(labels))
    none = ~pos.any(1)
    if none.any():
        w[none] = 1.0 / none.sum()
    return w


__all__ = ["CONTRACT", "balanced_weights", "collate", "dataset_labels", "to_uint8", "to_x"]
