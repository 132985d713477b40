"""`augment data show` and `augment data prepare`."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig

from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.sources import load_table
from augment.data.table import SPLITS, DataTable
from augment.common import print_table, resolve_classes

log = logging.getLogger(__name__)


def sample_grid(table: DataTable, classes: list[str], path: Path, *, per_class: int = 4, seed: int = 0) -> Path:
    """A PNG grid: one row per class (plus a healthy row), lesion masks outlined in red, lung
    fields (where known) in faint cyan."""
    matplotlib.use("Agg")  # files only, never a window
    rng = np.random.default_rng(seed)
    rows = [*classes] + ([NO_FINDING] if NO_FINDING not in classes and table.labelled_classes().count(NO_FINDING) else [])
    fig, axes = plt.subplots(len(rows), per_class, figsize=(1.9 * per_class, 1.9 * len(rows)), squeeze=False)
    for r, cls in enumerate(rows):
        col = table.column(cls)
        idx = np.flatnonzero(col == 1)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(pick):
                ax.set_visible(c < len(pick) or c == 0)
                if c == 0:
                    ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
                continue
            i = int(pick[c])
            ax.imshow(table.images[i], cmap="gray", vmin=0, vmax=255)
            lungs = table.anatomy.get("lungs")
            if lungs is not None and table.anatomy_known["lungs"][i]:
                ax.contour(lungs[i], levels=[0.5], colors="cyan", linewidths=0.5, alpha=0.5)
            if cls in table.lesion_masks and table.lesion_known[cls][i] and table.lesion_masks[cls][i].any():
                ax.contour(table.lesion_masks[cls][i], levels=[0.5], colors="red", linewidths=0.8)
            if c == 0:
                ax.set_ylabel(cls, fontsize=9)
    fig.suptitle(f"{table.source} ({table.image_size} px): red = lesion mask, cyan = lung fields", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / len(rows)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def show(cfg: DictConfig, out: Path) -> dict:
    """Per-class counts per split, printed as a table, and a sample grid PNG."""
    resolve_classes(cfg.classes)  # names first: a typo fails before any data is read
    table = load_table(cfg.data, show_progress=cfg.progress)
    classes = resolve_classes(cfg.classes, table)
    counts = table.counts(classes + ([NO_FINDING] if NO_FINDING in table.labelled_classes() else []))
    header = ["split", "images", *[k for k in counts["train"] if k != "images"]]
    rows = [[s, *[counts[s][k] for k in header[1:]]] for s in SPLITS]
    rows.append(["total", *[sum(counts[s][k] for s in SPLITS) for k in header[1:]]])
    print(f"data={table.source}: {len(table)} images at {table.image_size} px, "
          f"{len(np.unique(table.patient_ids))} patients")
    print_table(rows, header)
    grid = sample_grid(table, classes, out / cfg.show.grid_name, per_class=int(cfg.show.per_class), seed=int(cfg.seed))
    print(f"sample grid: {grid}")
    return {
        "source": table.source, "images": len(table), "image_size": table.image_size,
        "patients": int(len(np.unique(table.patient_ids))), "classes": classes, "counts": counts,
        "lesion_masks": sorted(table.lesion_masks), "anatomy_masks": sorted(table.anatomy),
        "fingerprint": table.fingerprint, "grid": str(grid),
    }


def prepare(cfg: DictConfig, out: Path) -> dict:
    """Build (or verify) the preprocessing cache of a data source."""
    t0 = time.perf_counter()
    table = load_table(cfg.data, show_progress=cfg.progress)
    seconds = time.perf_counter() - t0
    print(f"data={table.source}: {len(table)} images at {table.image_size} px cached (fingerprint {table.fingerprint}) in {seconds:.1f} s")
    return {"source": table.source, "images": len(table), "image_size": table.image_size,
            "fingerprint": table.fingerprint, "seconds": seconds,
            "labelled_classes": [c for c in table.labelled_classes() if c in VOCABULARY]}
