"""The ground floor under ``generators/`` and ``classifiers/``: small tools both libraries share.

Depends on torch, numpy, pillow (and tqdm for progress bars) only; never imports ``augment``,
``generators``, ``classifiers``, hydra, omegaconf, ray or optuna.

Conventions: dataset items are dicts ``{"image": uint8 1 x H x W, "labels": float32 C (1 / 0 / NaN,
NaN = not labelled), "weight": optional float32 scalar}``; on the device images become ``x``, float
in [-1, 1], B x 1 x H x W, with ``x = image / 127.5 - 1`` (:func:`to_x`) and back with
:func:`to_uint8`.

Modules: :mod:`cxrbase.items` (item contract, collate, uint8 <-> [-1, 1], labels, balanced weights),
:mod:`cxrbase.device`, :mod:`cxrbase.progress`, :mod:`cxrbase.versions`, :mod:`cxrbase.png`.
"""

from cxrbase.device import DeviceError, resolve_device
from cxrbase.items import balanced_weights, collate, dataset_labels, to_uint8, to_x
from cxrbase.png import write_png
from cxrbase.progress import bar, interactive, progress
from cxrbase.versions import versions

__all__ = [
    "DeviceError",
    "balanced_weights",
    "bar",
    "collate",
    "dataset_labels",
    "interactive",
    "progress",
    "resolve_device",
    "to_uint8",
    "to_x",
    "versions",
    "write_png",
]
