"""Preprocessing cache: images decoded and resized once into uint8 arrays, memory-mapped on reuse.

An entry is a folder ``<cache_root>/<source>-<key>/`` holding ``.npy`` arrays and ``meta.json``.
The key covers the source, its root, the image size and the file list (with sizes and mtimes),
so any change gives a new entry. Entries are written to a temporary folder and renamed when
complete, so an interrupted build leaves nothing that a later run would read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from augment.data.table import DataTable

log = logging.getLogger(__name__)


def cache_root(configured: str | None = None) -> Path:
    """Cache location: the config value, ``$AUGMENT_CACHE_DIR``, ``$XDG_CACHE_HOME/augment`` or ``~/.cache/augment``."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("AUGMENT_CACHE_DIR"):
        return Path(os.environ["AUGMENT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "augment"


def _save(table: DataTable, folder: Path) -> None:
    np.save(folder / "images.npy", np.ascontiguousarray(table.images))
    np.save(folder / "labels.npy", table.labels)
    meta = {
        "source": table.source,
        "fingerprint": table.fingerprint,
        "files": [str(f) for f in table.files],
        "patient_ids": [str(p) for p in table.patient_ids],
        "splits": [str(s) for s in table.splits],
        "lesions": sorted(table.lesion_masks),
        "anatomy": sorted(table.anatomy),
        "healthy": table.healthy is not None,
    }
    for name, arr in table.lesion_masks.items():
        np.save(folder / f"lesion_{name}.npy", arr)
        np.save(folder / f"lesion_{name}_known.npy", table.lesion_known[name])
    for name, arr in table.anatomy.items():
        np.save(folder / f"anatomy_{name}.npy", arr)
        np.save(folder / f"anatomy_{name}_known.npy", table.anatomy_known[name])
    if table.healthy is not None:
        np.save(folder / "healthy.npy", table.healthy)
    (folder / "meta.json").write_text(json.dumps(meta))


def _load(folder: Path) -> DataTable:
    meta = json.loads((folder / "meta.json").read_text())

    def mm(name: str) -> np.ndarray:
        return np.load(folder / name, mmap_mode="r")

    return DataTable(
        source=meta["source"],
        images=mm("images.npy"),
        labels=np.load(folder / "labels.npy"),
        patient_ids=np.asarray(meta["patient_ids"], dtype=object).astype(str),
        splits=np.asarray(meta["splits"], dtype=object).astype(str),
        files=np.asarray(meta["files"], dtype=object).astype(str),
        lesion_masks={n: mm(f"lesion_{n}.npy") for n in meta["lesions"]},
        lesion_known={n: np.load(folder / f"lesion_{n}_known.npy") for n in meta["lesions"]},
        anatomy={n: mm(f"anatomy_{n}.npy") for n in meta["anatomy"]},
        anatomy_known={n: np.load(folder / f"anatomy_{n}_known.npy") for n in meta["anatomy"]},
        healthy=mm("healthy.npy") if meta["healthy"] else None,
        fingerprint=meta["fingerprint"],
    )


def load_or_build(root: Path, key: str, build: Callable[[], DataTable], *, enabled: bool = True) -> DataTable:
    """Return the cached table for ``key``, building and storing it first when absent."""
    if not enabled:
        return build()
    folder = root / key
    if (folder / "meta.json").is_file():
        try:
            table = _load(folder)
            log.info("data cache hit: %s", folder)
            return table
        except (OSError, ValueError, KeyError) as exc:  # a damaged entry is rebuilt, not trusted
            log.warning("data cache entry %s is unreadable (%s); rebuilding it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    table = build()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        _save(table, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("data cache written: %s", folder)
    return _load(folder)
