"""`augment evaluate`: mask quality of the trained translators and image quality of a synthetic set.

Masks (where the run has translators): the test split is translated to ``No Finding``; the
difference map ``x - healed`` becomes a mask per finding (``mask.*`` rule). Against the phantom's
ground truth: Dice, IoU, PoI, detection AUC (max of the map), sensitivity at 1 FP per image, healing
L1/PSNR against the true healthy render, identity L1 on normal inputs; beside them a ``reference`` row
that scores the true healthy render itself through the same mask rule (a perfect healer: the most the
rule can give). On real data: detection AUC
from the image labels and the share of mask pixels inside the lung fields (where lung masks exist).

Image quality (``--synthetic DIR``): FID (domain features by default), KID, IS, precision/recall and
class fidelity, per class and overall, each beside its floor: the same metric between the real
train and test splits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.sources import load_table
from augment.data.table import DataTable
from augment.errors import UserError
from augment.stages.common import markdown_table, resolve_classes, versions

log = logging.getLogger(__name__)


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images, dtype=np.float32)[:, None] / 127.5 - 1.0)


def translator_checkpoints(models: Path) -> dict[str, Path]:
    from generators.checkpoint import load_checkpoint

    out = {}
    for ck in sorted((models / "models").glob("*/checkpoint.pt")):
        if load_checkpoint(ck).get("kind") == "translator":
            out[ck.parent.name] = ck
    return out


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
    from augment.stages.train import load_model, training_rows

    system, ck = load_model(ckpt)
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
        from augment.report import mask_overlay_figure

        result["figure"] = str(mask_overlay_figure(examples, figure, title=f"{ckpt.parent.name}: {split} images"))
    return result


def reference_mask_metrics(table: DataTable, classes: list[str], mask_cfg: dict, split: str = "test") -> dict | None:
    """The same metrics for a perfect healer: the data's own healthy render (the phantom's) as the
    translation, so the difference map is exactly the lesions.  What the mask rule can reach at best;
    ``None`` when the data has no healthy renders (real images)."""
    from augment.metrics.masks import mean_std, psnr
    from augment.stages.train import training_rows

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
    from augment.metrics.masks import detection_auc, identity_l1, lung_containment, mask_report, mean_std
    from generators.masks import MaskRuleError, diff_to_mask, finding_sign

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


def _feature_model(models: Path | None, checkpoint: str | None) -> tuple[Any, dict, Path]:
    from classifiers.model import load_classifier

    path = Path(checkpoint) if checkpoint else None
    if path is None and models is not None:
        hits = sorted((models / "models" / "classifier").glob("**/best.pt"))
        path = hits[0] if hits else None
    if path is None:
        raise UserError("no domain feature extractor: pass evaluate.feature_checkpoint=PATH (a checkpoint of "
                        "augment classify) or --models a train run that has models/classifier")
    try:
        model, meta = load_classifier(path)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load the feature extractor {path}: {exc}") from None
    return model, meta, path


def image_quality(cfg: DictConfig, table: DataTable, classes: list[str], synthetic: Path, models: Path | None) -> dict:
    """FID/KID/IS/PR/class fidelity of a synthetic set against the real train split, with floors."""
    from augment.data.synthetic import SyntheticDataset
    from augment.metrics import fid as F
    from augment.metrics import scores as S
    from augment.stages.generate import sha256

    ecfg = cfg.evaluate
    try:
        syn = SyntheticDataset(synthetic, with_masks=False)
    except ValueError as exc:
        raise UserError(f"{exc}: pass a folder written by `augment generate`") from None
    if len(syn) < 2:
        raise UserError(f"synthetic set {synthetic} has {len(syn)} image(s): FID needs at least 2")
    syn_classes = [c for c in syn.classes if c != NO_FINDING]
    lacking = [c for c in syn_classes if c not in table.labelled_classes()]
    if lacking:
        raise UserError(f"the synthetic set's classes {', '.join(lacking)} are absent from data={table.source}: "
                        "evaluate against data that has them")
    syn_images = np.stack([np.asarray(syn[i]["image"])[0] for i in range(len(syn))])
    sizes = {syn_images.shape[-1]}
    if sizes != {table.image_size}:
        raise UserError(f"synthetic images are {sizes.pop()} px but data.image_size={table.image_size}: "
                        "set data.image_size to the synthetic size")
    cls_eval = [c for c in syn_classes if c in classes] or syn_classes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = str(ecfg.fid.extractor)
    probs_model, meta, path = _feature_model(models, ecfg.get("feature_checkpoint"))
    if kind == "inception":
        try:
            extractor = F.InceptionExtractor(ecfg.fid.inception_weights, device=device)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
    elif kind == "domain":
        extractor = F.DomainExtractor(probs_model, sha256=sha256(path), name="domain").to(device)
    else:
        raise UserError(f"evaluate.fid.extractor={kind}: use domain or inception")
    bs = int(ecfg.batch_size)
    train_idx, test_idx = table.indices("train"), table.indices("test")
    cache = F.RealStatsCache(Path(str(ecfg.stats_cache)).expanduser() if ecfg.get("stats_cache") else
                             Path(str(table.images.filename)).parent if hasattr(table.images, "filename") else synthetic / ".fid-cache")

    def feats(images: np.ndarray) -> np.ndarray:
        return F.features(extractor, images, batch_size=bs, device=device)

    real_train = np.asarray(table.images[train_idx])
    real_test = np.asarray(table.images[test_idx])
    f_train = feats(real_train)
    f_test = feats(real_test)
    f_syn = feats(syn_images)
    stats_train = cache.get_or_compute(f"{table.source}-train", extractor.id, table.fingerprint,
                                       lambda: F.statistics(f_train, extractor_id=extractor.id))

    def fid(fa_stats: Any, fb: np.ndarray) -> float:
        return F.fid_from_stats(fa_stats, F.statistics(fb, extractor_id=extractor.id)).value

    lab_cols = [meta["classes"].index(c) for c in cls_eval if c in meta["classes"]]
    cls_model = [c for c in cls_eval if c in meta["classes"]]

    @torch.no_grad()
    def probs(images: np.ndarray) -> np.ndarray:
        m = probs_model.to(device).eval()
        out = [torch.sigmoid(m(_x(images[i:i + bs]).to(device)).float()).cpu().numpy() for i in range(0, len(images), bs)]
        return np.concatenate(out)[:, lab_cols]

    p_syn, p_test = probs(syn_images), probs(real_test)
    y_syn = np.asarray(syn.label_matrix())[:, [syn.classes.index(c) for c in cls_model]]
    y_train = table.labels[train_idx][:, [VOCABULARY.index(c) for c in cls_model]]
    y_test = table.labels[test_idx][:, [VOCABULARY.index(c) for c in cls_model]]
    subset = int(ecfg.kid_subset_size)

    def kid(a: np.ndarray, b: np.ndarray) -> float:
        return S.kid(a, b, subsets=int(ecfg.kid_subsets), subset_size=min(subset, len(a), len(b))).mean

    def pr(a: np.ndarray, b: np.ndarray) -> dict:
        if min(len(a), len(b)) <= int(ecfg.pr_k):
            return {"precision": None, "recall": None}
        r = S.precision_recall(a, b, k=int(ecfg.pr_k))
        return {"precision": r.precision, "recall": r.recall}

    overall = {
        "fid": fid(stats_train, f_syn), "fid_floor": fid(stats_train, f_test),
        "kid": kid(f_train, f_syn), "kid_floor": kid(f_train, f_test),
        **pr(f_train, f_syn), **{f"{k}_floor": v for k, v in pr(f_train, f_test).items()},
        "is": S.inception_score(p_syn, splits=min(10, len(p_syn)), normalize=True).mean,
        "is_floor": S.inception_score(p_test, splits=min(10, len(p_test)), normalize=True).mean,
    }
    fidelity = S.class_fidelity(p_syn, y_syn, classes=cls_model)
    fidelity_floor = S.class_fidelity(p_test, y_test, classes=cls_model)
    per: dict[str, dict] = {}
    for j, c in enumerate(cls_model):
        fs, ft, fr = f_syn[y_syn[:, j] == 1], f_test[y_test[:, j] == 1], f_train[y_train[:, j] == 1]
        row: dict[str, Any] = {"n_synthetic": len(fs), "n_real_train": len(fr), "n_real_test": len(ft),
                               "class_fidelity": fidelity.get(c), "class_fidelity_floor": fidelity_floor.get(c)}
        if len(fr) >= 2 and len(fs) >= 2:
            sr = F.statistics(fr, extractor_id=extractor.id)
            row.update(fid=fid(sr, fs), kid=kid(fr, fs), **pr(fr, fs))
            if len(ft) >= 2:
                row.update(fid_floor=fid(sr, ft), kid_floor=kid(fr, ft), **{f"{k}_floor": v for k, v in pr(fr, ft).items()})
        per[c] = row
    return {"extractor": extractor.id, "feature_checkpoint": str(path), "n_synthetic": len(syn),
            "n_real_train": len(train_idx), "n_real_test": len(test_idx), "overall": overall, "per_class": per,
            "class_fidelity_rule": "p(c) >= 0.5 by the domain classifier"}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def evaluate(cfg: DictConfig, out: Path) -> dict:
    """The ``augment evaluate`` stage."""
    from augment.stages.train import LATEST, find_models

    ecfg = cfg.evaluate
    resolve_classes(cfg.classes)
    synthetic = Path(str(ecfg.synthetic)).expanduser().resolve() if ecfg.synthetic else None
    if synthetic is not None and not synthetic.is_dir():
        raise UserError(f"--synthetic {synthetic} does not exist: pass a folder written by `augment generate`")
    models = None
    if ecfg.models or LATEST.is_file():
        models = find_models(ecfg.models)
    if synthetic is None and models is None:
        raise UserError("nothing to evaluate: pass --synthetic DIR and/or train translators first (`augment train`)")
    table = load_table(cfg.data, show_progress=cfg.progress)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    result: dict[str, Any] = {"data": table.source, "image_size": table.image_size, "classes": classes,
                              "versions": versions()}
    md: list[str] = []
    if models is not None:
        mask_cfg = {"rule": str(cfg.mask.rule), "threshold": float(cfg.mask.threshold),
                    "percentile": float(cfg.mask.percentile), "min_area": int(cfg.mask.min_area),
                    "smooth_sigma": float(cfg.mask.smooth_sigma)}
        masks = {fam: mask_metrics(table, classes, ck, mask_cfg, figure=out / f"masks_{fam}.png")
                 for fam, ck in translator_checkpoints(models).items()}
        if masks:
            result["masks"] = masks
            reference = reference_mask_metrics(table, classes, mask_cfg)
            if reference is not None:
                result["mask_reference"] = reference
                masks = {**masks, "reference": reference}
            keys = ["dice_mean", "iou_mean", "poi_mean", "detection_auc", "sensitivity_at_1fp",
                    "healing_psnr_mean", "identity_l1_mean", "lung_containment_mean"]
            rows = [[fam, c, *[_fmt(m["per_class"][c].get(k)) for k in keys]]
                    for fam, m in masks.items() for c in m["per_class"]]
            md.append("### Mask metrics (test split)\n\n" + markdown_table(rows, ["translator", "finding", "Dice", "IoU", "PoI",
                                                                               "det. AUC", "sens@1FP", "PSNR", "identity L1", "in lungs"]))
    if synthetic is not None:
        iq = image_quality(cfg, table, classes, synthetic, models)
        result["image_quality"] = iq
        o = iq["overall"]
        rows = [[k.upper() if k != "is" else "IS", _fmt(o[k]), _fmt(o.get(f"{k}_floor"))]
                for k in ("fid", "kid", "precision", "recall", "is")]
        md.append(f"### Image quality ({iq['n_synthetic']} synthetic vs {iq['n_real_train']} real train; floor = real test vs real train)\n\n"
                  f"Feature extractor: `{iq['extractor']}`\n\n" + markdown_table(rows, ["metric", "synthetic", "floor"]))
        rows = [[c, r["n_synthetic"], _fmt(r.get("fid")), _fmt(r.get("fid_floor")), _fmt(r.get("kid")), _fmt(r.get("kid_floor")),
                 _fmt(r.get("precision")), _fmt(r.get("recall")), _fmt(r.get("class_fidelity")), _fmt(r.get("class_fidelity_floor"))]
                for c, r in iq["per_class"].items()]
        md.append("### Per class\n\n" + markdown_table(rows, ["class", "n", "FID", "floor", "KID", "floor", "precision", "recall",
                                                              "fidelity", "floor"]))
    text = "\n\n".join(md)
    (out / "metrics.md").write_text(text + "\n")
    print(text)
    return result
