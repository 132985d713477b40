"""Mask quality of a translator on a data source: the one scoring protocol that ``augment evaluate``
reports and that the translator search optimises.

The split's healthy images and images of the chosen findings are translated to ``No Finding``; the
difference map ``x - healed`` becomes a mask per finding (the ``mask.*`` rule). Against exact ground
truth (the phantom): Dice, IoU, PoI, detection AUC (max of the map), sensitivity at 1 FP per image,
healing L1/PSNR against the true healthy render (lesion images only), identity L1 on normal inputs.
On real data: detection AUC from the image labels, identity L1 and the share of mask pixels inside
the lung fields (where lung masks exist). :func:`reference_mask_metrics` scores the phantom's true
healthy render through the same rule: the most the rule can give.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.table import DataTable
from augment.errors import UserError
from augment.jobs.gan import training_rows
from augment.metrics.masks import detection_auc, identity_l1, lung_containment, mask_report, mean_std, psnr
from augment.models import load_model
from augment.report import mask_overlay_figure
from generators.masks import MaskRuleError, diff_to_mask, finding_sign


def mask_rule(cfg: Any) -> dict:
    """The ``mask.*`` settings of a config as :func:`mask_metrics` and the shard workers take them."""
    return {"rule": str(cfg.mask.rule), "threshold": float(cfg.mask.threshold),
            "percentile": float(cfg.mask.percentile), "min_area": int(cfg.mask.min_area),
            "smooth_sigma": float(cfg.mask.smooth_sigma)}


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, dtype=np.float32)[:, None] / 127.5 - 1.0)


@torch.no_grad()
def translate_all(system: Any, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Healed images and difference maps (x - healed), float32 N x H x W in image units [-1, 1]."""
    healed, diffs = [], []
    n_cls = len(system.classes)
    for i in range(0, len(images), batch):
        x = _x(images[i:i + batch])
        t = system.translate(x, torch.zeros(len(x), n_cls))
        healed.append(t.image[:, 0].float().numpy())
        diffs.append(t.diff_map[:, 0].float().numpy())
    return np.concatenate(healed), np.concatenate(diffs)


def mask_metrics(table: DataTable, classes: list[str], ckpt: Path, mask_cfg: dict, split: str = "test",
                 figure: Path | None = None) -> dict:
    """Mask metrics of one translator on a split, per finding and overall; with ``figure``, also an
    overlay image of a few lesion images per finding there."""
    system, ck = load_model(ckpt, kind="translator")
    missing = [c for c in classes if c not in system.classes]
    if missing:
        raise UserError(f"translator {ckpt.parent.name} was not trained on {', '.join(missing)} (it knows "
                        f"{', '.join(system.classes)}): evaluate --classes {','.join(c.lower() for c in system.classes)} "
                        f"or train it with those classes")
    if int(ck["image_size"]) != table.image_size:
        raise UserError(f"translator {ckpt.parent.name} was trained at {ck['image_size']} px but data.image_size="
                        f"{table.image_size}: evaluate at data.image_size={ck['image_size']} (images are not resized)")
    rows = training_rows(table, classes, split)
    if len(rows) == 0:
        raise UserError(f"the {split} split has no healthy images or images of {', '.join(classes)}")
    images = np.asarray(table.images[rows])
    t0 = time.perf_counter()
    healed, diffs = translate_all(system, images)
    seconds = time.perf_counter() - t0
    examples: dict[str, list[dict]] = {}
    per = score_masks(table, classes, rows, healed, diffs, mask_cfg, examples)
    result = {"family": ckpt.parent.name, "per_class": per, "n_images": len(rows), "translate_seconds": seconds,
              "images_per_second": len(rows) / seconds if seconds else None, "mask_rule": mask_cfg}
    if figure is not None and examples:
        result["figure"] = str(mask_overlay_figure(examples, figure, title=f"{ckpt.parent.name}: {split} images"))
    return result


def reference_mask_metrics(table: DataTable, classes: list[str], mask_cfg: dict, split: str = "test") -> dict | None:
    """The same metrics for a perfect healer: the data's own healthy render (the phantom's) as the
    translation, so the difference map is exactly the lesions.  What the mask rule can reach at best;
    ``None`` when the data has no healthy renders (real images)."""
    if table.healthy is None:
        return None
    rows = training_rows(table, classes, split)
    if len(rows) == 0:
        return None
    healed = np.asarray(table.healthy[rows], dtype=np.float32) / 127.5 - 1.0
    x = np.asarray(table.images[rows], dtype=np.float32) / 127.5 - 1.0
    per = score_masks(table, classes, rows, healed, x - healed, mask_cfg)
    labels = table.labels[rows]
    for c in classes:
        lesion = (labels[:, VOCABULARY.index(c)] == 1) & np.asarray(table.lesion_masks[c][rows]).reshape(len(rows), -1).any(1) \
            if c in table.lesion_masks else np.zeros(len(rows), dtype=bool)
        if lesion.any() and "undefined" not in per[c]:
            # the floor: a translator that leaves its input unchanged heals this well
            per[c]["unchanged_psnr_mean"], per[c]["unchanged_psnr_std"] = mean_std(psnr(x[lesion], healed[lesion]))
    return {"family": "reference (true healthy render)", "per_class": per, "n_images": len(rows), "mask_rule": mask_cfg}


def score_masks(table: DataTable, classes: list[str], rows: np.ndarray, healed: np.ndarray, diffs: np.ndarray,
                mask_cfg: dict, examples: dict[str, list[dict]] | None = None, n_examples: int = 6) -> dict[str, dict]:
    """Per-finding mask metrics of healed images / difference maps (N x H x W, [-1, 1]) of ``rows``.

    ``examples``: when given, filled with the first ``n_examples`` images of each finding (image, healed,
    sign-corrected map, predicted mask, ground truth or lung mask where known) for the overlay figure.
    """
    labels = table.labels[rows]
    normal = labels[:, VOCABULARY.index(NO_FINDING)] == 1
    lungs = None
    if "lungs" in table.anatomy:
        known = table.anatomy_known["lungs"][rows]
        lungs = np.asarray(table.anatomy["lungs"][rows]) if known.all() else None
    healthy = None if table.healthy is None else np.asarray(table.healthy[rows], dtype=np.float32) / 127.5 - 1.0
    per: dict[str, dict] = {}
    for c in classes:
        pos = labels[:, VOCABULARY.index(c)] == 1
        sel = pos | normal
        if pos.sum() == 0:
            per[c] = {"undefined": "no test images with this finding"}
            continue
        sign = finding_sign(c)
        try:
            pred = diff_to_mask(diffs[sel][:, None], finding=c, **mask_cfg)[:, 0]
        except MaskRuleError as exc:
            raise UserError(f"mask rule selects nothing for {c} ({exc}): lower mask.threshold or use mask.rule=otsu") from None
        gt_known = c in table.lesion_masks and table.lesion_known[c][rows][sel].all()
        if gt_known:
            gt = np.asarray(table.lesion_masks[c][rows][sel])
            rep = mask_report(pred, gt, sign * diffs[sel], pos[sel].astype(float), healed[sel],
                              None if healthy is None else healthy[sel], normal[sel],
                              lung_masks=None if lungs is None else lungs[sel])
        else:  # real data: image labels only
            rep = {"detection_auc": detection_auc(sign * diffs[sel], pos[sel]) if normal[sel].any() else None,
                   "n_images": int(sel.sum()), "n_lesion_images": int(pos.sum())}
            if normal.any():
                rep["identity_l1_mean"], rep["identity_l1_std"] = mean_std(identity_l1(diffs, normal))
            if "lungs" in table.anatomy:
                known = table.anatomy_known["lungs"][rows][sel] & pos[sel]
                if known.any():
                    lc = lung_containment(pred[known], np.asarray(table.anatomy["lungs"][rows][sel][known]))
                    rep["lung_containment_mean"] = float(np.nanmean(lc))
                    rep["lung_containment_n"] = int(known.sum())
        per[c] = rep
        if examples is not None:
            examples[c] = _examples(table, c, rows[sel], pos[sel], healed[sel], sign * diffs[sel], pred, n_examples)
    return per


def _examples(table: DataTable, c: str, rows: np.ndarray, pos: np.ndarray, healed: np.ndarray, maps: np.ndarray,
              pred: np.ndarray, n: int) -> list[dict]:
    """The first ``n`` images with finding ``c`` among ``rows`` for the overlay figure, those with a
    ground truth or lung mask to draw first."""
    gts = table.lesion_masks.get(c)
    drawable = np.zeros(len(rows), dtype=bool)
    if gts is not None:
        drawable |= np.asarray(table.lesion_known[c][rows], dtype=bool)
    if "lungs" in table.anatomy:
        drawable |= np.asarray(table.anatomy_known["lungs"][rows], dtype=bool)
    cand = np.flatnonzero(pos)
    out = []
    for k in cand[np.argsort(~drawable[cand], kind="stable")][:n]:
        r = rows[k]
        gt_known = gts is not None and table.lesion_known[c][r]
        lungs_known = "lungs" in table.anatomy and table.anatomy_known["lungs"][r]
        out.append({"image": np.asarray(table.images[r]), "healed": healed[k], "map": maps[k], "mask": pred[k],
                    "gt": np.asarray(gts[r]) if gt_known else None,
                    "lungs": np.asarray(table.anatomy["lungs"][r]) if lungs_known else None})
    return out
