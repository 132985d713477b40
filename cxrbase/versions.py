"""Library versions recorded in checkpoints and results, as plain ``str`` (safe for ``weights_only`` loads)."""

from __future__ import annotations

import importlib.metadata
import platform

import numpy as np
import torch


def versions(*extra_packages: str) -> dict[str, str]:
    """``python``, ``torch``, ``numpy`` and each named distribution that is installed.

    Args:
        extra_packages: distribution names (``"timm"``, ``"augment"``, ...) read with
            ``importlib.metadata``; those not installed are left out.
    """
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(np.__version__)}
    for name in extra_packages:
        if name in out:
            continue
        try:
            out[name] = str(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


__all__ = ["versions"]
