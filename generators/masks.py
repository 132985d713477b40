"""Difference map -> binary lesion mask.

A translator heals an image; its difference map is ``x - healed`` (B x 1 x H x W, ``x`` in [-1, 1],
bright = dense).  A finding that *adds* opacity (most of them) shows as a positive difference; a
finding in :data:`DARKENING` (Pneumothorax, Emphysema: air, less density) shows as a negative one.
:func:`diff_to_mask` flips the sign per finding, thresholds with a configurable rule, optionally keeps
only the lung field, and drops connected components smaller than ``min_area``.
:func:`per_finding_masks` gives each finding of a multi-finding image its own mask by removing only
that finding.  Masks are in {0, 1}.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from generators.base import Translator

DARKENING: frozenset[str] = frozenset({"Pneumothorax", "Emphysema"})
RULES: tuple[str, ...] = ("otsu", "fixed", "percentile")
# 8-connectivity: a lesion touching at a corner is one lesion.
_CONNECTIVITY = np.ones((3, 3), dtype=bool)


class MaskRuleError(ValueError):
    """Invalid mask-rule arguments, or a rule that selected no pixel in a whole batch."""


def finding_sign(finding: str | None) -> int:
    """+1 when the finding adds opacity (the default, also for ``None``), -1 for :data:`DARKENING`."""
    if finding is None:
        return 1
    darkening = {f.lower() for f in DARKENING}
    return -1 if finding.strip().lower() in darkening else 1


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut maximising the between-class variance of a histogram of ``values``.

    Pixels strictly above the returned value form the upper class.  With fewer than two distinct
    values the threshold is just below the minimum, so every value is selected.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise MaskRuleError("otsu: no values to threshold")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return float(np.nextafter(lo, -np.inf))
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / v.size
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)
    m = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    k = int(np.argmax(between[:-1])) if bins > 1 else 0
    return float(edges[k + 1])


def _to_numpy(a: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _as_batch(a: np.ndarray, name: str) -> np.ndarray:
    """H x W -> 1 x 1 x H x W; B x 1 x H x W unchanged; anything else is an error."""
    if a.ndim == 2:
        return a[None, None]
    if a.ndim == 4 and a.shape[1] == 1:
        return a
    raise MaskRuleError(f"{name} must be H x W or B x 1 x H x W, got shape {a.shape}")


def _check_args(rule: str, threshold: float, percentile: float, min_area: int, smooth_sigma: float) -> None:
    if rule not in RULES:
        raise MaskRuleError(f"unknown mask rule {rule!r}; use one of {RULES}")
    if rule == "fixed" and not (np.isfinite(threshold) and threshold >= 0):
        raise MaskRuleError(f"rule 'fixed' needs a finite threshold >= 0, got {threshold}")
    if rule == "percentile" and not 0.0 <= percentile < 100.0:
        raise MaskRuleError(f"rule 'percentile' needs 0 <= percentile < 100, got {percentile}")
    if min_area < 0:
        raise MaskRuleError(f"min_area must be >= 0 pixels, got {min_area}")
    if smooth_sigma < 0:
        raise MaskRuleError(f"smooth_sigma must be >= 0, got {smooth_sigma}")


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop 8-connected components of a 2-D boolean ``mask`` with fewer than ``min_area`` pixels."""
    if min_area <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_area
    keep[0] = False
    return keep[labels]


def _threshold_image(s: np.ndarray, rule: str, threshold: float, percentile: float, min_value: float) -> np.ndarray:
    """Boolean mask of one image's signed evidence ``s`` (H x W) under ``rule``."""
    if rule == "fixed":
        return s > threshold
    candidates = s > min_value
    if not candidates.any():
        return candidates
    if rule == "percentile":
        t = float(np.percentile(s, percentile))
    else:
        t = otsu_threshold(s[candidates])
    return candidates & (s > t)


def diff_to_mask(
    diff_map: Tensor | np.ndarray,
    *,
    finding: str | None = None,
    rule: str = "otsu",
    threshold: float = 0.1,
    percentile: float = 95.0,
    lung_mask: Tensor | np.ndarray | None = None,
    min_area: int = 4,
    smooth_sigma: float = 0.0,
    min_value: float = 0.0,
) -> Tensor | np.ndarray:
    """Binary mask of where the translation removed ``finding``.

    Per image: signed evidence ``s = sign(finding) * diff_map`` (positive where the healed image is
    darker, i.e. an added opacity was removed; for :data:`DARKENING` findings the reverse), optional
    Gaussian smoothing, then the rule:

    - ``"fixed"``: ``s > threshold``.
    - ``"percentile"``: ``s`` above its ``percentile``-th percentile over the image, and ``> min_value``.
    - ``"otsu"``: Otsu's threshold over the pixels with ``s > min_value`` (only the finding's sign can be
      selected, so a healthy-looking image yields noise-level components that ``min_area`` removes).

    Then the mask is intersected with ``lung_mask`` if given, and 8-connected components with fewer
    than ``min_area`` pixels are removed.

    Args:
        diff_map: ``x - healed``, B x 1 x H x W (or H x W), tensor or array.
        finding: the finding whose removal produced the map; decides the sign.  ``None`` = opacity.
        rule: ``"otsu"``, ``"fixed"`` or ``"percentile"``.
        threshold: the ``"fixed"`` rule's threshold on ``s`` (in image units, [-1, 1] scale).
        percentile: the ``"percentile"`` rule's percentile in [0, 100).
        lung_mask: lung field in {0, 1}, H x W (shared) or B x 1 x H x W (per image).
        min_area: smallest kept component, in pixels (0 or 1 keeps everything).
        smooth_sigma: Gaussian sigma in pixels applied to ``s`` before thresholding (0 = none).
        min_value: ``"otsu"`` / ``"percentile"`` never select pixels with ``s <= min_value``.

    Returns:
        Masks in {0, 1} with the shape of ``diff_map``: a float tensor on its device for a tensor
        input, a ``uint8`` array for an array input.

    Raises:
        MaskRuleError: invalid arguments, or no pixel selected in any image of the batch.
    """
    _check_args(rule, threshold, percentile, min_area, smooth_sigma)
    is_tensor = isinstance(diff_map, Tensor)
    d = _to_numpy(diff_map)
    shape = d.shape
    d = _as_batch(d, "diff_map")
    if not np.isfinite(d).all():
        raise MaskRuleError("diff_map contains NaN or inf; check the translator's output")
    lung = None
    if lung_mask is not None:
        lung = _as_batch(_to_numpy(lung_mask), "lung_mask") > 0.5
        if lung.shape[2:] != d.shape[2:] or lung.shape[0] not in (1, d.shape[0]):
            raise MaskRuleError(
                f"lung_mask shape {lung.shape} does not match diff_map {d.shape}; give H x W or B x 1 x H x W"
            )
    s_all = finding_sign(finding) * d
    out = np.zeros(d.shape, dtype=bool)
    for i in range(d.shape[0]):
        s = s_all[i, 0]
        if smooth_sigma > 0:
            s = ndimage.gaussian_filter(s, sigma=smooth_sigma)
        m = _threshold_image(s, rule, threshold, percentile, min_value)
        if lung is not None:
            m &= lung[i if lung.shape[0] > 1 else 0, 0]
        out[i, 0] = remove_small_components(m, min_area)
    if not out.any():
        detail = {"fixed": f"threshold={threshold}", "percentile": f"percentile={percentile}"}.get(
            rule, f"min_value={min_value}"
        )
        raise MaskRuleError(
            f"mask rule {rule!r} ({detail}, min_area={min_area}, finding={finding!r}, sign "
            f"{'+' if finding_sign(finding) > 0 else '-'}) selected no pixel in any of the {d.shape[0]} "
            "images; lower the threshold / percentile / min_area, drop the lung mask, or check that the "
            "translator changes these images"
        )
    out = out.reshape(shape)
    if is_tensor:
        return torch.from_numpy(out.astype(np.float32)).to(diff_map.device)
    return out.astype(np.uint8)


def per_finding_masks(
    translator: Translator,
    x: Tensor,
    findings: Tensor,
    classes: Sequence[str],
    *,
    rule: str = "otsu",
    lung_mask: Tensor | np.ndarray | None = None,
    **mask_kwargs: float | int,
) -> dict[str, Tensor]:
    """One mask per finding, from translations that remove only that finding.

    For each finding present in at least one image, the images that have it are translated to their
    current labels minus that finding (a single-finding image is translated to ``No Finding``), and the
    difference map becomes a mask with that finding's sign.

    On a multi-finding image that request removes one finding and keeps the others.  A translator
    declaring ``partial_removal = False`` (TagGAN without partial-removal training) was never trained
    on such a request, so it is refused rather than answered with an untrained map.

    Args:
        translator: any :class:`~generators.base.Translator`.
        x: images B x 1 x H x W in [-1, 1].
        findings: labels B x len(classes), multi-hot (NaN read as absent).
        classes: names of ``findings``' columns; each must be one of ``translator.classes`` (the order
            may differ).
        rule: mask rule, see :func:`diff_to_mask`.
        lung_mask: H x W or B x 1 x H x W lung field, or ``None``.
        **mask_kwargs: the other :func:`diff_to_mask` options (threshold, percentile, min_area, ...).

    Returns:
        ``{finding: mask}``, each B x 1 x H x W float in {0, 1} on ``x``'s device, zero for the images
        without that finding.

    Raises:
        MaskRuleError: mismatched shapes or class names, or a finding whose rule selects nothing.
    """
    classes = list(classes)
    if findings.dim() != 2 or findings.shape != (x.shape[0], len(classes)):
        raise MaskRuleError(
            f"findings must be B x {len(classes)} for B={x.shape[0]} images, got {tuple(findings.shape)}"
        )
    unknown = [c for c in classes if c not in translator.classes]
    if unknown:
        raise MaskRuleError(f"findings {unknown} are not classes of this translator: {translator.classes}")
    labels = torch.nan_to_num(findings.float(), nan=0.0).to(x.device) > 0.5
    # the labels in the translator's column order
    current = torch.zeros(x.shape[0], len(translator.classes), device=x.device)
    for j, name in enumerate(classes):
        current[:, translator.classes.index(name)] = labels[:, j].float()
    lung = None
    if lung_mask is not None:
        lung = _to_numpy(lung_mask)
        if lung.ndim == 4 and lung.shape[0] != x.shape[0]:
            raise MaskRuleError(f"lung_mask has {lung.shape[0]} images for {x.shape[0]} inputs")
    multi = current.sum(1) > 1
    if getattr(translator, "partial_removal", True) is False and bool(multi.any()):
        raise MaskRuleError(
            f"{type(translator).__name__} was not trained to remove one finding and keep the others, but "
            f"{int(multi.sum())} image(s) have several findings; retrain it with partial removal (TagGAN: "
            "partial_removal > 0 and use_backward_cycle: true) or pass single-finding images"
        )
    masks: dict[str, Tensor] = {}
    for j, name in enumerate(classes):
        rows = labels[:, j].nonzero().flatten()
        if rows.numel() == 0:
            continue
        target = current[rows].clone()
        target[:, translator.classes.index(name)] = 0.0
        with torch.no_grad():
            diff = translator.translate(x[rows], target).diff_map
        sub_lung = lung[rows.cpu().numpy()] if lung is not None and lung.ndim == 4 else lung
        try:
            m = diff_to_mask(diff, finding=name, rule=rule, lung_mask=sub_lung, **mask_kwargs)
        except MaskRuleError as err:
            raise MaskRuleError(f"finding {name!r}: {err}") from err
        full = torch.zeros(x.shape[0], 1, *x.shape[2:], device=x.device)
        full[rows] = m.to(x.device)
        masks[name] = full
    return masks

