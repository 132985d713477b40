"""PNG writing, in one place, so every writer produces the same bytes for the same uint8 array."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_png(path: str | os.PathLike, array: np.ndarray, *, atomic: bool = False) -> Path:
    """Write a uint8 H x W array as a PNG (PIL, ``optimize=False``, ``compress_level=6``).

    Parent folders are created. With ``atomic=True`` the bytes go to ``.<name>.tmp`` beside the
    target first and are renamed with ``os.replace``, so a reader never sees a half-written file.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if not atomic:
        image.save(path, format="PNG", optimize=False, compress_level=6)
        return path
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", optimize=False, compress_level=6)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


__all__ = ["write_png"]
