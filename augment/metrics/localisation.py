"""Box localisation metrics: the ChestX-ray8 protocol (Wang et al. 2017, Table 4) and the pointing game.

Boxes are ``(x, y, w, h)`` floats in pixels (x = column, y = row).  On the pixel grid a box covers the
pixels whose centres ``(col + 0.5, row + 0.5)`` lie in ``[x, x + w) x [y, y + h)`` (:func:`box_mask`).

- **Predicted regions** (Wang et al.: "B-boxes covering the isolated regions" of the thresholded
  heatmap): the bounding box of each 8-connected component of a predicted binary mask
  (:func:`region_boxes`), in pixel-edge coordinates (a one-pixel component at row r, column c is
  ``(c, r, 1, 1)``).
- ``T(IoBB) = area(GT ∩ region) / area(region)`` and ``IoU = area(GT ∩ region) / area(GT ∪ region)``,
  computed on box geometry (:func:`iobb`, :func:`box_iou`).  A ground-truth box is **localised at
  T** when at least one predicted region scores ``> T`` (Wang et al.'s rule); its score is the best
  region's (:func:`box_scores`; 0 for an empty mask).
- **Pointing game** (Zhang et al. 2016, without tolerance): a hit when the map's maximum lies inside
  the box (:func:`pointing_hit`; the first maximum in row-major order, so a constant map points at
  the top-left pixel).
- :func:`box_table`: per finding, accuracy (share of boxes localised) at each threshold for IoBB and
  IoU and the pointing-game accuracy; the ``mean`` row is the unweighted mean over findings (Wang
  et al.'s "mean of 8 findings").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from augment.common import markdown_table

THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5)
_CONNECTIVITY = np.ones((3, 3), dtype=bool)

Box = tuple[float, float, float, float]


def box_mask(box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """H x W bool: the pixels whose centres lie in ``[x, x + w) x [y, y + h)``."""
    x, y, w, h = (float(v) for v in box)
    rows = np.arange(shape[0]) + 0.5
    cols = np.arange(shape[1]) + 0.5
    return ((rows >= y) & (rows < y + h))[:, None] & ((cols >= x) & (cols < x + w))[None, :]


def region_boxes(mask: Any) -> list[Box]:
    """Bounding boxes ``(x, y, w, h)`` of the 8-connected components of a 2-D mask (> 0.5 is on)."""
    m = np.asarray(mask) > 0.5
    if m.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {m.shape}")
    labels, n = ndimage.label(m, structure=_CONNECTIVITY)
    out: list[Box] = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        r, c = sl
        out.append((float(c.start), float(r.start), float(c.stop - c.start), float(r.stop - r.start)))
    return out


def _inter(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def iobb(region: Sequence[float], gt: Sequence[float]) -> float:
    """``area(gt ∩ region) / area(region)`` (0 for an empty region)."""
    area = float(region[2]) * float(region[3])
    return _inter(region, gt) / area if area > 0 else 0.0


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when both are empty)."""
    i = _inter(a, b)
    union = float(a[2]) * float(a[3]) + float(b[2]) * float(b[3]) - i
    return i / union if union > 0 else 0.0


def box_scores(mask: Any, gt: Sequence[float]) -> tuple[float, float]:
    """(best IoBB, best IoU) of the mask's predicted regions against one ground-truth box; (0, 0) when
    the mask is empty."""
    regions = region_boxes(mask)
    if not regions:
        return 0.0, 0.0
    return max(iobb(r, gt) for r in regions), max(box_iou(r, gt) for r in regions)


def pointing_hit(heatmap: Any, gt: Sequence[float]) -> bool:
    """True when the map's (first, row-major) maximum lies inside the box."""
    m = np.asarray(heatmap, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"heatmap must be H x W, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise ValueError("heatmap contains NaN or inf")
    r, c = np.unravel_index(int(np.argmax(m)), m.shape)
    return bool(box_mask(gt, m.shape)[r, c])


def accuracy(values: Iterable[float], thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float | None]:
    """Share of values strictly above each threshold (None for no values)."""
    v = np.asarray(list(values), dtype=np.float64)
    return {t: (float((v > t).mean()) if v.size else None) for t in thresholds}


def box_table(records: Iterable[dict], thresholds: Sequence[float] = THRESHOLDS) -> dict[str, dict]:
    """Per-finding accuracies from per-box records ``{"finding", "iobb", "iou", "hit"}``.

    Returns ``{finding: {"n_boxes", "iobb@<t>", "iou@<t>", "pointing"}}`` plus ``"mean"``: the
    unweighted mean over the findings (each finding counts once, whatever its number of boxes).
    """
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(str(r["finding"]), []).append(r)
    out: dict[str, dict] = {}
    for f, rs in by.items():
        row: dict[str, Any] = {"n_boxes": len(rs)}
        for name in ("iobb", "iou"):
            for t, a in accuracy([r[name] for r in rs], thresholds).items():
                row[f"{name}@{t:g}"] = a
        row["pointing"] = float(np.mean([bool(r["hit"]) for r in rs]))
        out[f] = row
    if out:
        keys = [k for k in next(iter(out.values())) if k != "n_boxes"]
        mean: dict[str, Any] = {"n_boxes": sum(r["n_boxes"] for r in out.values()), "n_findings": len(out)}
        for k in keys:
            vals = [r[k] for r in out.values() if r[k] is not None]
            mean[k] = float(np.mean(vals)) if vals else None
        out["mean"] = mean
    return out


#: The box table's columns: (key in a source's per-finding box row, header).
BOX_COLUMNS: tuple[tuple[str, str], ...] = (
    ("iobb@0.1", "IoBB>0.1"), ("iobb@0.25", "IoBB>0.25"), ("iobb@0.5", "IoBB>0.5"),
    ("iou@0.1", "IoU>0.1"), ("iou@0.25", "IoU>0.25"), ("iou@0.5", "IoU>0.5"), ("pointing", "pointing"),
)
#: The lesion-mask table's columns: (key in a source's per-finding mask row, header).
LESION_MASK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dice_mean", "Dice"), ("iou_mean", "IoU"), ("poi_mean", "PoI"), ("detection_auc", "det. AUC"),
    ("lung_containment_mean", "in lungs"), ("n_lesion_images", "n lesion"), ("n_normal_images", "n normal"),
)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def localisation_markdown(loc: dict) -> list[str]:
    """The box table and the mask table of each lesion set."""
    md = []
    for name, r in loc.items():
        if not isinstance(r, dict) or "boxes" not in r:
            continue
        if r["boxes"]:
            findings = list(dict.fromkeys(f for t in r["boxes"].values() for f in t))
            findings = [f for f in findings if f != "mean"] + ["mean"]
            rows = [[f, src, t[f]["n_boxes"], *[_cell(t[f].get(k)) for k, _ in BOX_COLUMNS]]
                    for f in findings for src, t in r["boxes"].items() if f in t]
            md.append(f"### Box localisation: {name} ({r['n_images']} images, {r['n_boxes']} boxes, {r['size']} px; "
                      "Wang et al. 2017: a box is found when a predicted region's T(IoBB) / IoU exceeds the threshold)\n\n"
                      + markdown_table(rows, ["finding", "source", "boxes", *[h for _, h in BOX_COLUMNS]]))
        if r["masks"]:
            rows = [[f, src, *[_cell(v.get(k)) for k, _ in LESION_MASK_COLUMNS]]
                    for src, per in r["masks"].items() for f, v in per.items()]
            md.append(f"### Lesion masks: {name}\n\n" + markdown_table(rows, ["finding", "source",
                                                                            *[h for _, h in LESION_MASK_COLUMNS]]))
        if r.get("not_scored"):
            md.append("Not scored (the classifier has no such output): " + "; ".join(
                f"{s}: {', '.join(fs)}" for s, fs in r["not_scored"].items()))
        if r.get("figure"):
            md.append(f"Overlays: `{r['figure']}`")
    return md


__all__ = ["BOX_COLUMNS", "LESION_MASK_COLUMNS", "THRESHOLDS", "accuracy", "box_iou", "box_mask", "box_scores", "box_table", "iobb", "localisation_markdown",
           "pointing_hit", "region_boxes"]
