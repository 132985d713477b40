"""The dataset item contract shared by training and prediction, and its batching.

An item is a dict with

- ``"image"``: uint8 tensor 1 x H x W (0..255). A floating-point image is taken to be ``x``
  already, i.e. in [-1, 1].
- ``"labels"``: float32 tensor of length C, entries 1 / 0 / NaN (NaN = not labelled).
- ``"weight"`` (optional): float32 scalar loss weight, 1 when absent (synthetic samples carry
  XRAY-GAN's xi here).

Other keys (masks, probabilities, ids) are ignored. On the device, images become
``x = image / 127.5 - 1``: float in [-1, 1], shape B x 1 x H x W; ``y`` is the B x C label matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def collate_items(items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack items into ``{"image": B x 1 x H x W, "labels": B x C, "weight": B}``.

    Items without ``"weight"`` get 1, so real and synthetic items can share a batch.

    Raises:
        KeyError: an item lacks ``image`` or ``labels``.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    try:
        images = torch.stack([torch.as_tensor(it["image"]) for it in items])
        labels = torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items])
    except KeyError as exc:
        raise KeyError(f"dataset items must be dicts with 'image' and 'labels'; missing {exc}") from None
    weights = torch.tensor([float(it.get("weight", 1.0)) for it in items], dtype=torch.float32)
    if images.ndim == 3:  # items gave H x W images
        images = images[:, None]
    return {"image": images, "labels": labels, "weight": weights}


def to_x(image: torch.Tensor, device: torch.device | str, *, channels_last: bool = False) -> torch.Tensor:
    """Move an image batch to ``device`` and map uint8 0..255 to float ``x`` in [-1, 1].

    The uint8 tensor is moved first (4x fewer bytes over the bus), then converted.
    """
    image = image.to(device, non_blocking=True)
    if image.dtype == torch.uint8:
        x = image.float().div_(127.5).sub_(1.0)
    else:
        x = image.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def dataset_labels(dataset: Any) -> np.ndarray:
    """The N x C label matrix of a dataset.

    Uses a ``label_matrix()`` method or a ``labels`` attribute (array-like N x C) when the dataset
    has one, otherwise reads every item (which decodes every image).
    """
    method = getattr(dataset, "label_matrix", None)
    labels = method() if callable(method) else getattr(dataset, "labels", None)
    if labels is not None:
        arr = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.float32)
        if arr.ndim == 2 and len(arr) == len(dataset):
            return arr
    log.info("dataset has no labels attribute: reading all %d items to get labels", len(dataset))
    return np.stack([np.asarray(dataset[i]["labels"], dtype=np.float32) for i in range(len(dataset))])


__all__ = ["collate_items", "dataset_labels", "to_x"]
