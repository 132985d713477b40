"""Mask and difference-map quality: overlap, detection, localisation, virtual healing.

Inputs are numpy arrays or CPU/GPU tensors (converted with ``.detach().cpu()``):

- masks (predicted, ground truth, lung): B x 1 x H x W or B x H x W in {0, 1} (> 0.5 counts as 1);
  a 2-D array is one image.
- difference maps ``x - healed``: same shapes, real-valued (pass sign-corrected maps, e.g.
  ``-diff`` for Pneumothorax, when a finding darkens the image).
- images (translated, true healthy): in [-1, 1].

Per-image metrics return one value per image; aggregates are the mean and the population std over
the images with a ground-truth lesion (the others have no lesion to find).  Definitions:

- Dice ``2|P & G| / (|P| + |G|)``, IoU ``|P & G| / |P | G|``; both 1.0 when P and G are both empty.
- PoI ``|P & G| / |P|``: the share of predicted lesion pixels that lie inside the ground truth, i.e.
  the pixel precision of the mask; 0.0 for an empty prediction (it identified nothing), so an empty
  mask cannot score well.  TagGAN reports PoI as the percentage of its disease-map pixels that fall
  inside the ground-truth bounding box ("true positive identification"; its IoU is low by design because
  boxes are larger than lesions).  With box ground truth (NIH ``BBox_List_2017.csv``) our PoI is that
  ratio; with pixel masks it is the same ratio against the tighter mask, so it is lower or equal.
- Detection AUC (Fixed-Point GAN's protocol): the score of an image is the maximum of its difference
  map; ROC AUC of abnormal vs healthy images.
- Sensitivity at ``k`` false positives per image (FROC): the map is binarised at a sweep of
  thresholds; each connected component (8-connected, at least ``min_area`` pixels) is a candidate; a
  ground-truth lesion (a connected component of the GT mask) is detected when the centroid of at least
  one candidate lies inside it; a candidate whose centroid lies in no lesion is a false positive.
  Reported: the highest lesion-level sensitivity among thresholds whose mean FP per image (over all
  images, healthy ones included) is <= k.
- Virtual healing: L1 (mean absolute difference) and PSNR between the translated image and the true
  healthy image, over the images with a lesion (a normal input's healing is its identity error).  PSNR uses the data range 2 of [-1, 1] images; identical images have infinite PSNR,
  which is capped at ``max_db`` (100 dB by default) so that means stay finite.
- Identity L1 on normal inputs: mean ``|x - healed|`` = mean ``|diff_map|`` over normal images.
- Lung containment: share of predicted mask pixels inside the lung mask, over the images with a
  lesion (NaN, skipped in means, when the prediction is empty).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

_CONNECTIVITY = np.ones((3, 3), dtype=bool)


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _images(a: Any, name: str) -> np.ndarray:
    """-> B x H x W float array."""
    a = _np(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim == 3:
        return a
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    raise ValueError(f"{name} must be H x W, B x H x W or B x 1 x H x W, got shape {a.shape}")


def _masks(a: Any, name: str) -> np.ndarray:
    return _images(a, name) > 0.5


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = _masks(pred, "pred"), _masks(gt, "gt")
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and gt {g.shape} differ")
    return p.reshape(len(p), -1), g.reshape(len(g), -1)


def dice(pred: Any, gt: Any) -> np.ndarray:
    """Per-image Dice; 1.0 when both masks are empty."""
    p, g = _pair(pred, gt)
    inter = (p & g).sum(1).astype(np.float64)
    total = p.sum(1) + g.sum(1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def iou(pred: Any, gt: Any) -> np.ndarray:
    """Per-image intersection over union; 1.0 when both masks are empty."""
    p, g = _pair(pred, gt)
    inter = (p & g).sum(1).astype(np.float64)
    union = (p | g).sum(1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def poi(pred: Any, gt: Any) -> np.ndarray:
    """Per-image PoI: share of predicted pixels inside the ground truth; 0.0 for an empty prediction."""
    p, g = _pair(pred, gt)
    inter = (p & g).sum(1).astype(np.float64)
    n_pred = p.sum(1)
    return np.where(n_pred == 0, 0.0, inter / np.maximum(n_pred, 1))


def detection_scores(diff_maps: Any) -> np.ndarray:
    """Per-image detection score: the maximum of the difference map."""
    d = _images(diff_maps, "diff_maps")
    return d.reshape(len(d), -1).max(1)


def detection_auc(diff_maps: Any, abnormal: Any) -> float:
    """ROC AUC of the max-of-map score for abnormal (1) vs healthy (0) images.

    Raises:
        ValueError: when only one of the two groups is present.
    """
    scores = detection_scores(diff_maps)
    y = _np(abnormal).reshape(-1) > 0.5
    if y.shape[0] != scores.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for {scores.shape[0]} maps")
    if y.all() or not y.any():
        raise ValueError("detection AUC needs both abnormal and healthy images")
    return float(roc_auc_score(y, scores))


def _components(binary: np.ndarray, min_area: int) -> list[tuple[float, float]]:
    """Centroids (row, col) of the 8-connected components with at least ``min_area`` pixels."""
    labels, n = ndimage.label(binary, structure=_CONNECTIVITY)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, idx)
    keep = idx[areas >= max(min_area, 1)]
    if keep.size == 0:
        return []
    return [tuple(c) for c in ndimage.center_of_mass(binary, labels, keep)]


def froc(
    diff_maps: Any,
    gt_masks: Any,
    *,
    thresholds: Any | None = None,
    n_thresholds: int = 50,
    min_area: int = 1,
) -> dict[str, np.ndarray]:
    """Free-response ROC points.

    Args:
        diff_maps: score maps (higher = more lesion-like).
        gt_masks: ground-truth lesion masks (all zero for healthy images).
        thresholds: thresholds to sweep; default ``n_thresholds`` quantiles of all map values plus one
            above the maximum (no candidates: 0 FP, 0 sensitivity).
        n_thresholds: number of default thresholds.
        min_area: smallest candidate component in pixels (Fixed-Point GAN used 10 at its resolution).

    Returns:
        ``{"thresholds", "sensitivity", "fp_per_image"}``, arrays ordered by increasing threshold.

    Raises:
        ValueError: mismatched shapes, or no ground-truth lesion at all.
    """
    d = _images(diff_maps, "diff_maps")
    g = _masks(gt_masks, "gt_masks")
    if d.shape != g.shape:
        raise ValueError(f"diff_maps {d.shape} and gt_masks {g.shape} differ")
    lesions = [ndimage.label(gi, structure=_CONNECTIVITY) for gi in g]
    n_lesions = sum(n for _, n in lesions)
    if n_lesions == 0:
        raise ValueError("FROC needs at least one ground-truth lesion")
    if thresholds is None:
        qs = np.quantile(d, np.linspace(0.0, 1.0, n_thresholds))
        thresholds = np.unique(np.append(qs, np.nextafter(d.max(), np.inf)))
    t = np.sort(_np(thresholds).reshape(-1))
    sens = np.zeros(len(t))
    fps = np.zeros(len(t))
    h, w = d.shape[1:]
    for k, thr in enumerate(t):
        detected = 0
        fp = 0
        for di, (lab, _) in zip(d, lesions):
            hit: set[int] = set()
            for r, c in _components(di > thr, min_area):
                lesion = lab[min(int(round(r)), h - 1), min(int(round(c)), w - 1)]
                if lesion > 0:
                    hit.add(int(lesion))
                else:
                    fp += 1
            detected += len(hit)
        sens[k] = detected / n_lesions
        fps[k] = fp / len(d)
    return {"thresholds": t, "sensitivity": sens, "fp_per_image": fps}


def sensitivity_at_fp(diff_maps: Any, gt_masks: Any, *, fp_per_image: float = 1.0, **froc_kwargs: Any) -> float:
    """Highest FROC sensitivity at a mean of at most ``fp_per_image`` false positives per image."""
    curve = froc(diff_maps, gt_masks, **froc_kwargs)
    ok = curve["fp_per_image"] <= fp_per_image
    return float(curve["sensitivity"][ok].max()) if ok.any() else 0.0


def healing_l1(translated: Any, healthy: Any) -> np.ndarray:
    """Per-image mean absolute difference between the translated and the true healthy image."""
    a, b = _images(translated, "translated"), _images(healthy, "healthy")
    if a.shape != b.shape:
        raise ValueError(f"translated {a.shape} and healthy {b.shape} differ")
    return np.abs(a - b).reshape(len(a), -1).mean(1)


def psnr(translated: Any, healthy: Any, *, data_range: float = 2.0, max_db: float | None = 100.0) -> np.ndarray:
    """Per-image PSNR in dB, ``10 log10(data_range^2 / MSE)``; identical images give ``max_db``
    (``inf`` when ``max_db`` is None)."""
    a, b = _images(translated, "translated"), _images(healthy, "healthy")
    if a.shape != b.shape:
        raise ValueError(f"translated {a.shape} and healthy {b.shape} differ")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        val = 10.0 * np.log10(data_range**2 / mse)
    return val if max_db is None else np.minimum(val, max_db)


def identity_l1(diff_maps: Any, is_normal: Any) -> np.ndarray:
    """Per-image mean ``|x - healed|`` for the normal inputs only (one value per normal image)."""
    d = _images(diff_maps, "diff_maps")
    normal = _np(is_normal).reshape(-1) > 0.5
    if normal.shape[0] != d.shape[0]:
        raise ValueError(f"{normal.shape[0]} flags for {d.shape[0]} maps")
    if not normal.any():
        return np.zeros(0)
    return np.abs(d[normal]).reshape(int(normal.sum()), -1).mean(1)


def lung_containment(pred: Any, lung: Any) -> np.ndarray:
    """Per-image share of predicted pixels inside the lung mask (NaN for an empty prediction).

    ``lung`` is one H x W mask for all images or one per image.
    """
    p = _masks(pred, "pred")
    m = _masks(lung, "lung")
    if m.shape[0] == 1 and p.shape[0] > 1:
        m = np.broadcast_to(m, p.shape)
    if p.shape != m.shape:
        raise ValueError(f"pred {p.shape} and lung {m.shape} differ")
    p, m = p.reshape(len(p), -1), m.reshape(len(m), -1)
    n = p.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n == 0, np.nan, (p & m).sum(1) / n)


def mean_std(values: Any) -> tuple[float, float]:
    """Mean and population std of the finite values (NaN, NaN when there are none)."""
    v = _np(values).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


def _put(report: dict[str, float | int | None], name: str, values: np.ndarray) -> None:
    m, s = mean_std(values)
    report[f"{name}_mean"] = None if math.isnan(m) else m
    report[f"{name}_std"] = None if math.isnan(s) else s


def mask_report(
    pred_masks: Any,
    gt_masks: Any,
    diff_maps: Any,
    labels: Any,
    translated: Any | None,
    healthy: Any | None,
    is_normal: Any | None,
    *,
    lung_masks: Any | None = None,
    fp_per_image: float = 1.0,
    min_area: int = 1,
    max_db: float | None = 100.0,
) -> dict[str, float | int | None]:
    """All mask metrics at once; ``None`` where a metric is undefined for the given data.

    Args:
        pred_masks: predicted masks.
        gt_masks: ground-truth masks (all zero for healthy images).
        diff_maps: (sign-corrected) difference maps ``x - healed``.
        labels: B x C multi-hot (NaN = absent) or B flags; an image is abnormal when any entry is 1.
        translated: healed images, or ``None`` to skip healing metrics.
        healthy: the true healthy images (e.g. phantom), or ``None`` to skip healing metrics.
        is_normal: B flags marking truly normal inputs (identity L1), or ``None`` to skip it.
        lung_masks: lung masks for containment, or ``None``.
        fp_per_image: FROC operating point.
        min_area: smallest FROC candidate component, pixels.
        max_db: PSNR cap.

    Returns:
        ``dice_mean/std``, ``iou_mean/std``, ``poi_mean/std``, healing and lung containment (images with
        a GT lesion), identity L1 (normal images), detection AUC and FROC (all images):
        ``detection_auc``, ``sensitivity_at_<k>fp``, ``healing_l1_mean/std``, ``healing_psnr_mean/std``,
        ``identity_l1_mean/std``, ``lung_containment_mean/std``, ``n_images``, ``n_lesion_images``.
    """
    gt = _masks(gt_masks, "gt_masks")
    pred = _masks(pred_masks, "pred_masks")
    lab = np.nan_to_num(_np(labels), nan=0.0)
    abnormal = (lab.reshape(lab.shape[0], -1) > 0.5).any(1)
    has_lesion = gt.reshape(len(gt), -1).any(1)
    report: dict[str, float | int | None] = {"n_images": int(len(gt)), "n_lesion_images": int(has_lesion.sum())}
    _put(report, "dice", dice(pred[has_lesion], gt[has_lesion]) if has_lesion.any() else np.array([]))
    _put(report, "iou", iou(pred[has_lesion], gt[has_lesion]) if has_lesion.any() else np.array([]))
    _put(report, "poi", poi(pred[has_lesion], gt[has_lesion]) if has_lesion.any() else np.array([]))
    try:
        report["detection_auc"] = detection_auc(diff_maps, abnormal)
    except ValueError:
        report["detection_auc"] = None
    key = f"sensitivity_at_{fp_per_image:g}fp"
    report[key] = (
        sensitivity_at_fp(diff_maps, gt, fp_per_image=fp_per_image, min_area=min_area) if has_lesion.any() else None
    )
    if translated is not None and healthy is not None and has_lesion.any():
        # healing is judged on the images that have something to heal; normal inputs are identity_l1's
        t, h = _images(translated, "translated")[has_lesion], _images(healthy, "healthy")[has_lesion]
        _put(report, "healing_l1", healing_l1(t, h))
        _put(report, "healing_psnr", psnr(t, h, max_db=max_db))
    if is_normal is not None:
        _put(report, "identity_l1", identity_l1(diff_maps, is_normal))
    if lung_masks is not None and has_lesion.any():
        lungs = _masks(lung_masks, "lung_masks")
        if lungs.shape[0] == len(gt):  # one per image (else one mask for all)
            lungs = lungs[has_lesion]
        _put(report, "lung_containment", lung_containment(pred[has_lesion], lungs))
    return report
