"""`augment evaluate`: mask quality of the trained translators and image quality of a synthetic set.

Masks (where the run has translators): :mod:`augment.jobs.masks` scores every translator of the
run on the test split (the protocol is described there), beside a ``reference`` row on the phantom.

Image quality (``--synthetic DIR``): FID (domain features by default), KID, IS, precision/recall and
class fidelity, per class and overall, each beside its floor: the same metric between the real
train and test splits. Each metric is one entry of :data:`IMAGE_METRICS` or :data:`MASK_COLUMNS`.

Localisation on real lesions (``evaluate.localisation=[nih_bbox,covidqu_infection,jsrt_nodules]``):
the random-map control, Grad-CAM and Grad-CAM++ of the classifier (``evaluate.sources``) and every
translator of ``--models`` go through the same mask rule; per set a box table (Wang et al. 2017's
T(IoBB) / IoU accuracy at 0.1 / 0.25 / 0.5 and the pointing game, per finding), a mask table (Dice /
IoU / PoI / detection AUC against pixel masks, lung containment) and an overlay PNG
(:mod:`augment.jobs.saliency`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from augment.common import markdown_table, resolve_classes, versions
from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.sources import load_table
from augment.data.synthetic import SyntheticDataset
from augment.data.table import DataTable
from augment.data.lesions import LESION_SETS, load_lesion_set
from augment.errors import UserError
from augment.jobs.masks import mask_metrics, mask_rule, reference_mask_metrics
from augment.jobs.saliency import build_sources, localise
from augment.metrics.localisation import localisation_markdown
from augment.metrics import fid as F
from augment.metrics import scores as S
from augment.models import LATEST, classifier_checkpoint, find_models, sha256, translator_checkpoints
from classifiers.model import load_classifier
from cxrbase import resolve_device, to_x

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageMetric:
    """One image-quality metric: ``compute(real, feats, probs, ecfg, stats)`` -> ``{key: value}``, where
    ``real`` and ``feats`` are the real and compared features, ``probs`` the domain classifier's class
    probabilities of the compared images (None per class) and ``stats`` the real features' cached FID
    statistics. The floor is the same call on the real test split."""

    label: str
    keys: tuple[str, ...]
    compute: Callable[..., dict[str, float | None]]
    per_class: bool = True  # also computed per class (FID, KID, PR) or overall only (IS)



def _device(ecfg) -> "torch.device":
    """``evaluate.device`` (auto = CUDA when present); ``cpu`` keeps every model of the stage off the GPU."""
    try:
        return resolve_device(str(ecfg.device))
    except ValueError as exc:
        raise UserError(f"evaluate.device: {exc}") from None

def _fid(real: np.ndarray, feats: np.ndarray, probs: np.ndarray | None, ecfg: Any, stats: Any) -> dict:
    return {"fid": F.fid_from_stats(stats, F.statistics(feats, extractor_id=stats.extractor_id)).value}


def _kid(real: np.ndarray, feats: np.ndarray, probs: np.ndarray | None, ecfg: Any, stats: Any) -> dict:
    size = min(int(ecfg.kid_subset_size), len(real), len(feats))
    return {"kid": S.kid(real, feats, subsets=int(ecfg.kid_subsets), subset_size=size).mean}


def _pr(real: np.ndarray, feats: np.ndarray, probs: np.ndarray | None, ecfg: Any, stats: Any) -> dict:
    if min(len(real), len(feats)) <= int(ecfg.pr_k):
        return {"precision": None, "recall": None}
    r = S.precision_recall(real, feats, k=int(ecfg.pr_k))
    return {"precision": r.precision, "recall": r.recall}


def _is(real: np.ndarray, feats: np.ndarray, probs: np.ndarray | None, ecfg: Any, stats: Any) -> dict:
    return {"is": S.inception_score(probs, splits=min(10, len(probs)), normalize=True).mean}


#: The image-quality metrics of ``augment evaluate --synthetic``, in report order: a new metric is one entry.
IMAGE_METRICS: tuple[ImageMetric, ...] = (
    ImageMetric("FID", ("fid",), _fid),
    ImageMetric("KID", ("kid",), _kid),
    ImageMetric("precision / recall", ("precision", "recall"), _pr),
    ImageMetric("IS", ("is",), _is, per_class=False),
)

#: The mask table's columns: (key in a translator's per-finding report, header).
MASK_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dice_mean", "Dice"), ("iou_mean", "IoU"), ("poi_mean", "PoI"), ("detection_auc", "det. AUC"),
    ("sensitivity_at_1fp", "sens@1FP"), ("healing_psnr_mean", "PSNR"), ("identity_l1_mean", "identity L1"),
    ("lung_containment_mean", "in lungs"),
)


def _feature_model(models: Path | None, checkpoint: str | None) -> tuple[Any, dict, Path]:
    path = Path(checkpoint) if checkpoint else None
    if path is None and models is not None:
        path = classifier_checkpoint(models)
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
    device = _device(ecfg)
    kind = str(ecfg.fid.extractor)
    probs_model, meta, path = _feature_model(models, ecfg.feature_checkpoint)
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
    cache = F.RealStatsCache(Path(str(ecfg.stats_cache)).expanduser() if ecfg.stats_cache else
                             Path(str(table.images.filename)).parent if hasattr(table.images, "filename") else synthetic / ".fid-cache")

    def feats(images: np.ndarray) -> np.ndarray:
        return F.features(extractor, images, batch_size=bs, device=device)

    def real_features(split: str, rows: np.ndarray) -> np.ndarray:
        """The split's features, from the cache when the same extractor already saw the same rows."""
        return cache.features_or_compute(f"{table.source}-{split}", extractor.id,
                                         f"{table.fingerprint}:{F.array_fingerprint(rows)}",
                                         lambda: feats(np.asarray(table.images[rows])))

    f_train = real_features("train", train_idx)
    f_test = real_features("test", test_idx)
    f_syn = feats(syn_images)
    stats_train = cache.get_or_compute(f"{table.source}-train", extractor.id,
                                       f"{table.fingerprint}:{F.array_fingerprint(train_idx)}",
                                       lambda: F.statistics(f_train, extractor_id=extractor.id))

    lab_cols = [meta["classes"].index(c) for c in cls_eval if c in meta["classes"]]
    cls_model = [c for c in cls_eval if c in meta["classes"]]

    @torch.no_grad()
    def probs(images: np.ndarray) -> np.ndarray:
        m = probs_model.to(device).eval()
        out = [torch.sigmoid(m(to_x(torch.from_numpy(images[i:i + bs][:, None]), device)).float()).cpu().numpy()
               for i in range(0, len(images), bs)]
        return np.concatenate(out)[:, lab_cols]

    p_syn, p_test = probs(syn_images), probs(np.asarray(table.images[test_idx]))
    y_syn = np.asarray(syn.label_matrix())[:, [syn.classes.index(c) for c in cls_model]]
    y_train = table.labels[train_idx][:, [VOCABULARY.index(c) for c in cls_model]]
    y_test = table.labels[test_idx][:, [VOCABULARY.index(c) for c in cls_model]]

    def measure(real: np.ndarray, feats_: np.ndarray, probs_: np.ndarray | None, stats: Any,
                per_class: bool = False) -> dict:
        row: dict[str, Any] = {}
        for metric in IMAGE_METRICS:
            if metric.per_class or not per_class:
                row.update(metric.compute(real, feats_, probs_, ecfg, stats))
        return row

    overall = measure(f_train, f_syn, p_syn, stats_train)
    overall.update({f"{k}_floor": v for k, v in measure(f_train, f_test, p_test, stats_train).items()})
    fidelity = S.class_fidelity(p_syn, y_syn, classes=cls_model)
    fidelity_floor = S.class_fidelity(p_test, y_test, classes=cls_model)
    per: dict[str, dict] = {}
    for j, c in enumerate(cls_model):
        fs, ft, fr = f_syn[y_syn[:, j] == 1], f_test[y_test[:, j] == 1], f_train[y_train[:, j] == 1]
        row: dict[str, Any] = {"n_synthetic": len(fs), "n_real_train": len(fr), "n_real_test": len(ft),
                               "class_fidelity": fidelity.get(c), "class_fidelity_floor": fidelity_floor.get(c)}
        if len(fr) >= 2 and len(fs) >= 2:
            sr = F.statistics(fr, extractor_id=extractor.id)
            row.update(measure(fr, fs, None, sr, per_class=True))
            if len(ft) >= 2:
                row.update({f"{k}_floor": v for k, v in measure(fr, ft, None, sr, per_class=True).items()})
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
    ecfg = cfg.evaluate
    resolve_classes(cfg.classes)
    synthetic = Path(str(ecfg.synthetic)).expanduser().resolve() if ecfg.synthetic else None
    if synthetic is not None and not synthetic.is_dir():
        raise UserError(f"--synthetic {synthetic} does not exist: pass a folder written by `augment generate`")
    sets = [str(s) for s in (ecfg.localisation or [])]
    unknown = [s for s in sets if s not in LESION_SETS]
    if unknown:
        raise UserError(f"evaluate.localisation names unknown set(s) {', '.join(unknown)}: use {', '.join(LESION_SETS)}")
    models = None
    if ecfg.models or LATEST.is_file():
        models = find_models(ecfg.models)
    if synthetic is None and models is None and not sets:
        raise UserError("nothing to evaluate: pass --synthetic DIR, train translators first (`augment train`) "
                        "and/or set evaluate.localisation=[nih_bbox,covidqu_infection]")
    result: dict[str, Any] = {"versions": versions()}
    md: list[str] = []
    if sets:
        loc = localisation(cfg, sets, models, out)
        result["localisation"] = loc
        md += localisation_markdown(loc)
    if models is None and synthetic is None:
        return _finish(result, md, out)
    table = load_table(cfg.data, show_progress=cfg.progress)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    result.update({"data": table.source, "image_size": table.image_size, "classes": classes})
    if models is not None:
        mask_cfg = mask_rule(cfg)
        masks = {fam: mask_metrics(table, classes, ck, mask_cfg, figure=out / f"masks_{fam}.png")
                 for fam, ck in translator_checkpoints(models).items()}
        if masks:
            result["masks"] = masks
            reference = reference_mask_metrics(table, classes, mask_cfg)
            if reference is not None:
                result["mask_reference"] = reference
                masks = {**masks, "reference": reference}
            rows = [[fam, c, *[_fmt(m["per_class"][c].get(k)) for k, _ in MASK_COLUMNS]]
                    for fam, m in masks.items() for c in m["per_class"]]
            md.append("### Mask metrics (test split)\n\n" + markdown_table(rows, ["translator", "finding",
                                                                               *[h for _, h in MASK_COLUMNS]]))
    if synthetic is not None:
        iq = image_quality(cfg, table, classes, synthetic, models)
        result["image_quality"] = iq
        o = iq["overall"]
        rows = [[k.upper() if k != "is" else "IS", _fmt(o[k]), _fmt(o.get(f"{k}_floor"))]
                for metric in IMAGE_METRICS for k in metric.keys]
        md.append(f"### Image quality ({iq['n_synthetic']} synthetic vs {iq['n_real_train']} real train; floor = real test vs real train)\n\n"
                  f"Feature extractor: `{iq['extractor']}`\n\n" + markdown_table(rows, ["metric", "synthetic", "floor"]))
        rows = [[c, r["n_synthetic"], _fmt(r.get("fid")), _fmt(r.get("fid_floor")), _fmt(r.get("kid")), _fmt(r.get("kid_floor")),
                 _fmt(r.get("precision")), _fmt(r.get("recall")), _fmt(r.get("class_fidelity")), _fmt(r.get("class_fidelity_floor"))]
                for c, r in iq["per_class"].items()]
        md.append("### Per class\n\n" + markdown_table(rows, ["class", "n", "FID", "floor", "KID", "floor", "precision", "recall",
                                                              "fidelity", "floor"]))
    return _finish(result, md, out)


def _finish(result: dict, md: list[str], out: Path) -> dict:
    text = "\n\n".join(md)
    (out / "metrics.md").write_text(text + "\n")
    print(text)
    return result


def localisation(cfg: DictConfig, sets: list[str], models: Path | None, out: Path) -> dict:
    """Scores of the mask sources (``evaluate.sources`` and the translators of ``models``) on the real
    lesion sets ``sets`` (:mod:`augment.jobs.saliency`), with one overlay PNG per set."""
    ecfg = cfg.evaluate
    size = int(ecfg.localisation_size)
    classifier = Path(str(ecfg.classifier)).expanduser() if ecfg.classifier else (
        classifier_checkpoint(models) if models is not None else None)
    translators = translator_checkpoints(models) if models is not None else {}
    real_root = Path(str(ecfg.real_root)) if ecfg.real_root else None
    sources = build_sources([str(s) for s in ecfg.sources], seed=int(cfg.seed), size=size, classifier=classifier,
                            translators=translators, layer=ecfg.gradcam_layer, random_cell_px=int(ecfg.random_cell_px),
                            batch_size=int(ecfg.batch_size), device=_device(ecfg), real_root=real_root)
    limit = None if ecfg.limit is None else int(ecfg.limit)
    result: dict[str, Any] = {"classifier": str(classifier) if classifier else None,
                              "translators": {k: str(v) for k, v in translators.items()},
                              "sources": [s.name for s in sources], "seed": int(cfg.seed)}
    loaded = {name: load_lesion_set(name, Path(str(ecfg.lesions_root)), real_root, size=size, limit=limit)
              for name in sets}  # every set is checked before any is scored
    for name, ls in loaded.items():
        fig = out / f"localisation_{name}.png" if int(ecfg.overlays) > 0 else None
        result[name] = localise(ls, sources, mask_rule(cfg), n_examples=int(ecfg.overlays), figure=fig)
    return result
