"""NIH boxes at 128 px (Wang et al. 2017 protocol): random-map control vs Grad-CAM / Grad-CAM++ of a
classifier trained on real NIH images, and (``--translators``) learning curves of the translators
trained on the same real images, with no scored image (or patient) seen in training.

What trains on what (two folds, so every ``nih_bbox`` image is scored exactly once):

- ``nih_bbox``'s 361 patients are split in two folds by a seeded permutation (``--seed``).
- The classifier of fold k (timm ``--model``, from scratch, 1 channel, ``--size`` px, 8 outputs: the 8
  box findings, multi-label) trains on the ChestX-ray14 images of ``cxr-real`` (``nih_kcr2019_64px``,
  upsampled from 64 px, and ``nih_fullres``) **minus every patient that has an image in nih_bbox**,
  plus the nih_bbox images of the *other* fold (their image-level labels only, never their boxes).
- It is scored on the nih_bbox images of fold k: each box against the map of that box's finding.
- ``--translators fixed_point,taggan,branched``: each family of fold k trains on the same images as the
  fold's classifier, restricted to what a translator can learn from (as ``augment train``'s
  ``training_rows``): the ``No Finding`` images (the normals it heals towards) and the images whose
  labels are among the 8 findings and nothing else.  The family config is the project YAML
  (``configs/translator/<family>.yaml``, composed with ``data.image_size=--size``), plus ``--fewshot``
  (DiffAugment ``translation,cutout,brightness,contrast`` + LeCam 0.1, and for Fixed-Point GAN the R1
  recipe: ``adv=bce``, ``lambda_gp=0``, ``lambda_r1=1``, ``n_critic=1``) and ``--translator-overrides``
  (any Hydra overrides, applied to every family, after ``--fewshot``).  Batch size, balanced batches,
  EMA and AMP come from the YAML's ``train.*``.  Each translator is checkpointed at the CPU-time marks
  ``--minutes``: **process CPU time** (``time.process_time``: user + system time of every thread of
  this process, so with 2 torch threads a CPU-minute is about half a wall minute) spent in its training
  loop, the scoring at the marks excluded.  At each mark the EMA generator (as ``augment evaluate``
  loads it) heals the fold's scored images to ``No Finding``; the signed difference goes through the
  same map -> mask rule and :func:`~augment.jobs.saliency.localise` as the CAMs.
- ``--covid``: the same on ``covidqu_infection`` (one finding, ``Pneumonia`` = COVID-19 infection):
  its images are split in two folds by near-duplicate group (``overlaps.csv``; a ``cxr-real`` image
  that duplicates one of them joins its group), and fold k's classifier (1 output) and translators
  train on the ``covid_*`` images of ``cxr-real`` labelled ``Pneumonia`` or ``No Finding`` (minus the
  duplicates of fold k's images) plus the other fold's covidqu images (image labels only, never the
  masks).  Scored: Dice / IoU / PoI against the infection masks, detection AUC (max of the map,
  COVID vs normal images), and the box protocol on the masks' component boxes.

The whole-lung reference ``lung_atlas`` (the mean of the 247 JSRT manual lung masks of ``--real``, the same
map for every image: what "the lung field" scores without looking at the image) is scored on both sets.
The random control is scored with ``--random-seeds`` seeds (its spread), the CAMs and translators with
the fold models of one training seed.  The tables print per finding and their mean (unweighted over
the findings, as Wang et al.'s "mean of 8"); ``--out`` keeps the checkpoints (each translator's last
mark), ``metrics.json``, ``tables.md`` and (with translators) ``curves.png``: box accuracy at
IoBB > 0.25 vs CPU-minutes per family, random and Grad-CAM as horizontal lines.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/quality_localisation.py --out runs/loc128 --epochs 8
    # the learning curves (about 5 h on one core: 240 translator CPU-minutes + 4 classifiers + scoring).
    # The YAML widths (64) cost ~20 CPU-s per Fixed-Point step at 128 px (batch 32, 1 thread), hence the
    # Kermany widths of quality_translators.py: then ~7 (Fixed-Point, R1 1:1), ~6 (TagGAN) and ~24
    # (Branched, 5 branches) CPU-s per step, i.e. ~165 / ~200 / ~50 steps by 20 CPU-minutes.
    OMP_NUM_THREADS=1 python benchmarks/quality_localisation.py --out runs/loc128t --epochs 8 --threads 1 \\
        --translators fixed_point,taggan,branched --fewshot --minutes 5,10,20 --covid \\
        --translator-overrides translator.g_width=16 translator.d_width=16 \\
        fixed_point:translator.n_res=2 taggan:translator.n_res=2
    python benchmarks/quality_localisation.py --quick --out /tmp/locq      # sanity run, 32 px, seconds
    python benchmarks/quality_localisation.py --quick --out /tmp/locq --translators fixed_point  # < 1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.config import build, compose, to_dict  # noqa: E402
from augment.data.labels import NO_FINDING, canonical  # noqa: E402
from augment.data.lesions import LesionSet, load_lesion_set, lung_atlas, subset  # noqa: E402
from augment.errors import UserError  # noqa: E402
from augment.jobs.masks import mask_rule, translate_all  # noqa: E402
from augment.jobs.saliency import CamMaps, LungAtlasMaps, MapSource, RandomMaps, localise  # noqa: E402
from augment.metrics.localisation import box_table  # noqa: E402
from augment.models import load_model, model_config  # noqa: E402
from classifiers.model import create_classifier, save_checkpoint  # noqa: E402
from classifiers.train import train_classifier  # noqa: E402
from generators.masks import finding_sign  # noqa: E402
from generators.train import CheckpointConfig, CheckpointHook, HookBase, LogConfig, LoopConfig, TrainState, fit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
COVID = ["Pneumonia"]
COLS = [("iobb@0.1", "IoBB>0.1"), ("iobb@0.25", "IoBB>0.25"), ("iobb@0.5", "IoBB>0.5"), ("iou@0.1", "IoU>0.1"),
        ("iou@0.25", "IoU>0.25"), ("iou@0.5", "IoU>0.5"), ("pointing", "pointing")]
MASK_COLS = [("dice_mean", "Dice"), ("iou_mean", "IoU"), ("poi_mean", "PoI"), ("detection_auc", "det. AUC")]
FAMILIES = ("fixed_point", "taggan", "branched")
#: ``--fewshot``: the few-shot toolkit of issue 17 (configs/translator/*.yaml): DiffAugment + LeCam for
#: every family, and Fixed-Point GAN's R1 recipe (one critic step per G step).
FEWSHOT_ALL = ["translator.fewshot.diffaug='translation,cutout,brightness,contrast'", "translator.fewshot.lecam_weight=0.1"]
FEWSHOT_FAMILY = {"fixed_point": ["translator.adv=bce", "translator.lambda_gp=0.0", "translator.lambda_r1=1.0",
                                  "translator.n_critic=1"]}
#: ``--quick``: tiny widths so a translator step takes milliseconds at 32 px.
QUICK_FAMILY = {"fixed_point": ["translator.g_width=8", "translator.d_width=8", "translator.n_res=1"],
                "taggan": ["translator.g_width=8", "translator.d_width=8", "translator.n_res=1"],
                "branched": ["translator.g_width=8", "translator.d_width=8", "translator.n_branches=2"]}
QUICK_MINUTES = [0.02, 0.04]  # 1.2 and 2.4 CPU-seconds
QUICK_REAL, QUICK_TRAIN_LESION, QUICK_SCORED = 48, 16, 8  # per class group / per fold


class Arrays(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str] | None = None) -> None:
        self.images, self.labels = images, labels.astype(np.float32)
        self.classes = list(classes or FINDINGS)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.images[i][None].copy()), "labels": torch.from_numpy(self.labels[i])}


def multi_hot(labels: list[tuple[str, ...]], classes: list[str] | None = None) -> np.ndarray:
    classes = classes or FINDINGS
    return np.array([[float(f in lab) for f in classes] for lab in labels], dtype=np.float32).reshape(len(labels), len(classes))


def translator_ok(labels: list[tuple[str, ...]], classes: list[str]) -> np.ndarray:
    """Rows a translator over ``classes`` can learn from (``augment train``'s ``training_rows``): normals,
    and images with one of ``classes`` and no other finding (so all-zero labels really mean healthy)."""
    cs = set(classes)
    return np.array([lab == (NO_FINDING,) or (bool(set(lab) & cs) and set(lab) <= cs) for lab in labels], dtype=bool)


def read_images(root: Path, files, size: int) -> np.ndarray:
    out = [np.asarray(Image.open(root / f).convert("L").resize((size, size), Image.Resampling.LANCZOS)) for f in files]
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def quick_rows(labels: list[tuple[str, ...]], n: int, seed: int) -> np.ndarray:
    """A seeded handful for ``--quick``: up to ``n`` normals and ``n`` lesion images."""
    normal = np.array([lab == (NO_FINDING,) for lab in labels], dtype=bool)
    rng = np.random.default_rng(seed)
    pick = [rng.permutation(np.flatnonzero(m))[:n] for m in (normal, ~normal)]
    return np.sort(np.concatenate(pick)).astype(int)


def real_nih(real_root: Path, exclude_patients: set[str], size: int = 128, limit: int | None = None,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, int, list[tuple[str, ...]]]:
    df = pd.read_csv(real_root / "labels.csv", dtype=str, keep_default_na=False)
    nih = df[df["file"].str.startswith(("images/nih_kcr2019_64px/", "images/nih_fullres/")) & (df["labels"] != "")]
    dropped = int(nih["patient_id"].isin(exclude_patients).sum())
    nih = nih[~nih["patient_id"].isin(exclude_patients)]
    labs = [tuple(canonical(t) for t in cell.split("|")) for cell in nih["labels"]]
    if limit is not None:
        keep = quick_rows(labs, limit, seed)
        nih, labs = nih.iloc[keep], [labs[i] for i in keep]
    imgs = read_images(real_root, nih["file"], size)
    return imgs, multi_hot(labs), dropped, labs


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


# -------------------------------------------------------------------------------------- map sources
class FoldMaps(MapSource):
    """One source over a whole scored set: each image's map comes from the model of its own fold
    (``fold[key]``), so one :func:`localise` call pools the folds (box records, Dice, detection AUC)."""

    def __init__(self, name: str, by_fold: dict[int, MapSource], fold: np.ndarray) -> None:
        self.name, self.by_fold, self.fold = name, by_fold, np.asarray(fold)
        self.normalise = next(iter(by_fold.values())).normalise

    def knows(self, finding: str) -> bool:
        return all(s.knows(finding) for s in self.by_fold.values())

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=int)
        out = np.zeros(images.shape, np.float32)
        for k, src in self.by_fold.items():
            sel = self.fold[keys] == k
            if sel.any():
                out[sel] = src.maps(images[sel], finding, keys[sel])
        return out


class DiffMaps(MapSource):
    """A translator's signed difference maps, computed at a mark and held for the scored images
    (``diffs[key]``: x - healed-to-No-Finding, image units), as :class:`~augment.jobs.saliency.TranslatorMaps`."""

    normalise = False

    def __init__(self, name: str, diffs: np.ndarray) -> None:
        self.name, self.diffs = name, diffs

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:
        return finding_sign(finding) * self.diffs[np.asarray(keys, dtype=int)].astype(np.float32)


# -------------------------------------------------------------------------------------- translators
class _Done(Exception):
    """Raised by :class:`CpuMarks` after the last mark to end ``fit``'s endless loop."""


class CpuMarks(HookBase):
    """Call ``on_mark(state, minutes, train_cpu_s)`` when the training loop's process CPU time passes
    each mark (CPU spent in ``on_mark`` itself is not counted), then stop the loop."""

    def __init__(self, minutes: list[float], on_mark: Callable[[TrainState, float, float], None]) -> None:
        self.minutes, self.on_mark = list(minutes), on_mark
        self.next, self.t0, self.excluded = 0, 0.0, 0.0

    def before_train(self, state: TrainState) -> None:
        self.t0 = time.process_time()

    def after_step(self, state: TrainState) -> None:
        spent = time.process_time() - self.t0 - self.excluded
        while self.next < len(self.minutes) and spent >= 60.0 * self.minutes[self.next]:
            s0 = time.process_time()
            self.on_mark(state, self.minutes[self.next], spent)
            self.excluded += time.process_time() - s0
            self.next += 1
        if self.next >= len(self.minutes):
            raise _Done


def family_overrides(family: str, overrides: list[str]) -> list[str]:
    """``--translator-overrides`` for one family: ``key=value`` applies to every family,
    ``family:key=value`` to that family only (e.g. ``fixed_point:translator.n_res=2``: Branched has no n_res)."""
    out = []
    for o in overrides:
        head, sep, rest = o.partition(":")
        if sep and head in FAMILIES and "=" not in head:
            if head == family:
                out.append(rest)
        else:
            out.append(o)
    return out


def translator_overrides(family: str, args: argparse.Namespace) -> list[str]:
    return [f"translator={family}", f"data.image_size={args.size}", *(QUICK_FAMILY[family] if args.quick else []),
            *((FEWSHOT_ALL + FEWSHOT_FAMILY.get(family, [])) if args.fewshot else []),
            *family_overrides(family, args.translator_overrides)]


def translator_config(family: str, classes: list[str], args: argparse.Namespace) -> tuple[dict, dict]:
    """(model config, train.* settings) of a family from the project YAML and the overrides."""
    cfg = to_dict(compose(translator_overrides(family, args)))
    return model_config(cfg["translator"], classes), cfg["train"]


def train_translator(family: str, classes: list[str], ds: Arrays, out: Path, args: argparse.Namespace,
                     score_images: np.ndarray, trained_on: str) -> dict:
    """Train one family until the last CPU mark; at each mark checkpoint it (``out/checkpoint.pt``,
    overwritten), reload it as ``augment evaluate`` does (EMA generator, eval mode) and keep its
    difference maps of ``score_images``.  Returns ``{"marks": [...], "diffs": {minutes: N x S x S}}``."""
    mcfg, tcfg = translator_config(family, classes, args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(args.seed))  # weight init is drawn here; the caller's RNG state is restored
        system = build(mcfg)
    out.mkdir(parents=True, exist_ok=True)
    batch = int(tcfg["translator_batch_size"] or tcfg["batch_size"])
    if args.quick:
        batch = 8
    meta = {"model_cfg": mcfg, "classes": mcfg["classes"], "image_size": int(args.size), "kind": "translator",
            "family": family, "trained_on": trained_on}
    saver = CheckpointHook(out / "checkpoint.pt", every=10**12)
    marks: list[dict] = []
    diffs: dict[float, np.ndarray] = {}
    wall0 = time.perf_counter()

    def on_mark(state: TrainState, minutes: float, spent: float) -> None:
        saver.save(state)
        model, _ = load_model(out / "checkpoint.pt", kind="translator")
        _, d = translate_all(model, score_images)
        diffs[minutes] = d.astype(np.float16)
        marks.append({"minutes": minutes, "train_cpu_s": spent, "step": state.step,
                      "images_seen": state.step * batch, "wall_s": time.perf_counter() - wall0})
        print(f"  {family} {out.parent.name} {out.parent.parent.name}: {minutes:g} CPU-min at step {state.step} "
              f"(wall {time.perf_counter() - wall0:.0f} s)", flush=True)

    loop = LoopConfig(batch_size=batch, max_steps=10**12, seed=int(args.seed), device=args.device,
                      amp=bool(tcfg["amp"]), balanced=bool(tcfg["balanced"]), num_workers=0, ema_decay=tcfg["ema_decay"])
    try:
        fit(system, ds, loop, checkpoint=CheckpointConfig(out, every=10**12, resume=False, meta=meta),
            logs=LogConfig(every=10, progress=False), hooks=[CpuMarks(args.minutes, on_mark)])
    except _Done:
        pass
    settings = {"batch_size": batch, "balanced": bool(tcfg["balanced"]), "ema_decay": tcfg["ema_decay"],
                "overrides": translator_overrides(family, args)[1:], "model_cfg": mcfg}
    return {"marks": marks, "diffs": diffs, "settings": settings}


# ------------------------------------------------------------------------------------------- folds
def train_fold_classifier(train: Arrays, classes: list[str], path: Path, args: argparse.Namespace, trained_on: str):
    cfg = {"model_name": args.model, "num_classes": len(classes), "in_chans": 1}
    model = create_classifier(**cfg, init_seed=args.seed)
    res = train_classifier(model, train, None, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           device=args.device, seed=args.seed, balanced=True, progress=False)
    ck = save_checkpoint(path, model.eval().cpu(), model_cfg=cfg, classes=classes, image_size=args.size,
                         metrics={"train_seconds": res.train_seconds}, extra={"trained_on": trained_on})
    return model, res, ck


def probs_of(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images[:, None]).float() / 127.5 - 1
        return torch.sigmoid(torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])).numpy()


def curves_for(set_name: str, scored: LesionSet, fold: np.ndarray, families: list[str], classes: list[str],
               train_sets: dict[int, Arrays], args: argparse.Namespace, mask_cfg: dict, trained_on: dict[int, str]) -> dict:
    """Train every family per fold; score each CPU mark on the pooled folds. Returns per family:
    ``{"settings", "folds": {k: marks}, "marks": [{"minutes", "boxes", "masks"}]}``."""
    out: dict = {}
    for fam in families:
        diffs: dict[float, np.ndarray] = {}
        fam_info: dict = {"folds": {}, "marks": []}
        for k, ds in train_sets.items():
            rows = np.flatnonzero(fold == k)
            r = train_translator(fam, classes, ds, args.out / set_name / f"fold{k}" / fam, args, scored.images[rows],
                                 trained_on[k])
            fam_info["settings"] = r["settings"]
            fam_info["folds"][k] = {"train_images": len(ds), "marks": r["marks"]}
            for m, d in r["diffs"].items():
                diffs.setdefault(m, np.zeros(scored.images.shape, np.float16))[rows] = d
        for m in args.minutes:
            src = DiffMaps(f"{fam} @ {m:g} min", diffs[m])
            res = localise(scored, [src], mask_cfg, n_examples=0)
            fam_info["marks"].append({"minutes": m, "boxes": res["boxes"].get(src.name, {}),
                                      "masks": res["masks"].get(src.name, {})})
        out[fam] = fam_info
    return out


def covid_part(args: argparse.Namespace, mask_cfg: dict, families: list[str], atlas: MapSource) -> dict:
    """``covidqu_infection``: folds by near-duplicate group; classifier (1 output), CAMs, random and the
    translators' curves, pooled over the folds."""
    ls = load_lesion_set("covidqu_infection", args.lesions, size=args.size)
    groups = np.asarray(ls.groups)
    uniq = np.unique(groups)
    perm = np.random.default_rng(args.seed).permutation(len(uniq))
    fold_of_group = {int(uniq[j]): k % 2 for k, j in enumerate(perm)}
    fold_all = np.array([fold_of_group[int(g)] for g in groups])
    # cxr-real images that duplicate a covidqu image belong to that image's group (and fold)
    index = {f: i for i, f in enumerate(ls.files)}
    pairs = pd.read_csv(ls.root / "overlaps.csv", dtype=str, keep_default_na=False) if (ls.root / "overlaps.csv").is_file() \
        else pd.DataFrame(columns=["file", "other"])
    real_fold: dict[str, set[int]] = {}
    for a, b in zip(pairs["file"], pairs["other"]):
        if a in index and str(b).startswith("cxr-real/"):
            real_fold.setdefault(str(b)[len("cxr-real/"):], set()).add(int(fold_all[index[a]]))
    df = pd.read_csv(args.real / "labels.csv", dtype=str, keep_default_na=False)
    cov = df[df["file"].str.startswith("images/covid_") & df["labels"].isin(["Pneumonia", NO_FINDING])]
    real_labs = [(canonical(c),) for c in cov["labels"]]
    if args.quick:
        keep = quick_rows(real_labs, QUICK_REAL // 2, args.seed)
        cov, real_labs = cov.iloc[keep], [real_labs[i] for i in keep]
    real_imgs = read_images(args.real, cov["file"], args.size)
    real_files = list(cov["file"])
    ok_lab = translator_ok(ls.labels, COVID)
    scored_rows, train_sets, cls_sets, trained_on, info_folds = [], {}, {}, {}, {}
    for k in (0, 1):
        score = np.flatnonzero(fold_all == k)
        train_rows = np.flatnonzero((fold_all != k) & ok_lab)
        if args.quick:
            score = score[quick_rows([ls.labels[i] for i in score], QUICK_SCORED // 2, args.seed + k)]
            train_rows = train_rows[quick_rows([ls.labels[i] for i in train_rows], QUICK_TRAIN_LESION // 2, args.seed)]
        real_keep = np.array([k not in real_fold.get(f, set()) for f in real_files], dtype=bool)
        x = np.concatenate([real_imgs[real_keep], ls.images[train_rows]])
        labs = [lab for lab, m in zip(real_labs, real_keep) if m] + [ls.labels[i] for i in train_rows]
        y = multi_hot(labs, COVID)
        cls_sets[k] = train_sets[k] = Arrays(x, y, COVID)
        n_norm = sum(lab == (NO_FINDING,) for lab in labs)
        trained_on[k] = (f"cxr-real covid_ieee8023/covid_figure1/covid_actualmed images labelled Pneumonia or No Finding "
                         f"({int(real_keep.sum())}, minus {int((~real_keep).sum())} near-duplicates of fold-{k} covidqu "
                         f"images) + covidqu_infection fold {1 - k} ({len(train_rows)} images, image labels only); "
                         f"{len(labs) - n_norm} Pneumonia, {n_norm} No Finding")
        info_folds[k] = {"train_images": len(labs), "train_pneumonia": len(labs) - n_norm, "train_normal": n_norm,
                         "train_cxr_real": int(real_keep.sum()), "cxr_real_dropped_near_duplicates": int((~real_keep).sum()),
                         "train_covidqu": len(train_rows), "scored_images": len(score), "trained_on": trained_on[k]}
        scored_rows.append(score)
        assert not set(groups[score]) & set(groups[train_rows])
    rows = np.concatenate(scored_rows)
    scored = subset(ls, rows)
    fold = fold_all[rows]
    cams: dict[str, dict[int, MapSource]] = {"gradcam": {}, "gradcam_pp": {}}
    aucs = []
    for k in (0, 1):
        model, res, ck = train_fold_classifier(cls_sets[k], COVID, args.out / "covidqu_infection" / f"fold{k}" / "classifier.pt",
                                               args, trained_on[k])
        info_folds[k].update({"classifier_train_seconds": res.train_seconds, "checkpoint": str(ck)})
        sel = np.flatnonzero(fold == k)
        p = probs_of(model, scored.images[sel])[:, 0]
        y = np.array([lab == ("Pneumonia",) for lab in (scored.labels[i] for i in sel)], dtype=float)
        aucs.append(float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None)
        for v in cams:
            cams[v][k] = CamMaps(model, COVID, variant=v, layer=args.layer, device=args.device)
    sources: list[MapSource] = []
    for s in args.random_seeds:
        src = RandomMaps(s)
        src.name = f"random (seed {s})"
        sources.append(src)
    sources += [FoldMaps(v, by, fold) for v, by in cams.items()]
    sources.append(atlas)
    base = localise(scored, sources, mask_cfg, n_examples=6, figure=args.out / "overlays_covid.png")
    curves = curves_for("covidqu_infection", scored, fold, families, COVID, train_sets, args, mask_cfg, trained_on) \
        if families else {}
    return {"n_scored": len(scored), "n_scored_lesion": int((~scored.normal()).sum()), "n_scored_normal": int(scored.normal().sum()),
            "n_groups": int(len(uniq)), "folds": info_folds, "classifier_auc_per_fold": aucs, "boxes": base["boxes"],
            "masks": base["masks"], "translators": curves,
            "trained_on": {"classifier": "fold k: cxr-real covid_* images labelled Pneumonia or No Finding, minus the "
                                         "near-duplicates of fold k's covidqu images, + covidqu_infection fold 1-k (image "
                                         "labels only, never the masks); 1 output (Pneumonia)",
                           "folds": {k: info_folds[k]["trained_on"] for k in (0, 1)},
                           "translators": "the same images as the fold's classifier (all are No Finding or Pneumonia only)",
                           "scored": "covidqu_infection fold k (folds by near-duplicate group of overlaps.csv)"}}


# -------------------------------------------------------------------------------------------- output
def random_mean(tables: dict, prefix: str = "random") -> dict:
    rnd = [n for n in tables if n.startswith(prefix)]
    return {f: {k: float(np.mean([tables[n][f][k] or 0.0 for n in rnd])) for k, _ in COLS} | {
        f"{k}_std": float(np.std([tables[n][f][k] or 0.0 for n in rnd])) for k, _ in COLS} | {"n_boxes": tables[rnd[0]][f]["n_boxes"]}
        for f in tables[rnd[0]]}


def mask_mean(masks: dict, prefix: str = "random") -> dict:
    rnd = [n for n in masks if n.startswith(prefix)]
    out = {}
    for f in masks[rnd[0]]:
        row = {}
        for k, _ in MASK_COLS:
            vals = [masks[n][f].get(k) for n in rnd if masks[n][f].get(k) is not None]
            row[k] = float(np.mean(vals)) if vals else None
            row[f"{k}_std"] = float(np.std(vals)) if vals else None
        out[f] = row
    return out


def box_row(f: str, name: str, t: dict, spread: bool = False) -> str:
    cells = [f"{t[k]:.3f} ± {t[k + '_std']:.3f}" if spread else fmt(t[k]) for k, _ in COLS]
    return f"| {f} | {t['n_boxes']} | {name} | " + " | ".join(cells) + " |"


def curve_figure(path: Path, nih_curves: dict, nih_levels: dict, covid: dict | None) -> Path:
    from augment.report import _plt

    plt = _plt()
    panels = [("nih_bbox: box accuracy, T(IoBB) > 0.25 (mean of 8)", nih_curves, nih_levels, "boxes", "iobb@0.25")]
    if covid is not None and covid.get("translators"):
        lv = {"random": covid["boxes_random"]["mean"]["iobb@0.25"], "gradcam": covid["boxes"]["gradcam"]["mean"]["iobb@0.25"],
              "gradcam_pp": covid["boxes"]["gradcam_pp"]["mean"]["iobb@0.25"]}
        panels.append(("covidqu_infection: component boxes, T(IoBB) > 0.25", covid["translators"], lv, "boxes", "iobb@0.25"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    colours = {"random": "grey", "gradcam": "tab:red", "gradcam_pp": "tab:orange"}
    for ax, (title, curves, levels, part, key) in zip(axes[0], panels):
        for fam, c in curves.items():
            xs = [m["minutes"] for m in c["marks"]]
            ys = [(m[part].get("mean") or {}).get(key) for m in c["marks"]]
            ax.plot(xs, [np.nan if y is None else y for y in ys], marker="o", label=fam)
        for name, v in levels.items():
            if v is not None:
                ax.axhline(v, color=colours.get(name, "black"), linestyle="--" if name != "random" else ":", label=name)
        ax.set_xlabel("training CPU-minutes (process CPU time, all threads)")
        ax.set_ylabel("accuracy at T(IoBB) > 0.25")
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lesions", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-lesions")
    p.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-real")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=None, help="image size in px (default 128; 32 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="fold split and training seed")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layer", default=None, help="CAM layer (default: the last conv stage)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--translators", default="", help="comma-separated families to train per fold: fixed_point,taggan,branched")
    p.add_argument("--translator-overrides", nargs="*", default=[], help="Hydra overrides for every translator "
                   "(e.g. translator.g_width=32 translator.fewshot.lecam_weight=0.3), or for one family with its "
                   "name first (fixed_point:translator.n_res=2)")
    p.add_argument("--fewshot", action="store_true", help="DiffAugment translation,cutout,brightness,contrast + LeCam 0.1 "
                   "(+ Fixed-Point GAN's R1 recipe: adv=bce, lambda_gp=0, lambda_r1=1, n_critic=1)")
    p.add_argument("--minutes", default=None, help="translator checkpoints at these training CPU-minutes "
                   "(process CPU time, all threads; default 5,10,20; 0.02,0.04 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS; "
                   "1 with --quick). Use 1 for the curves: process CPU time counts the spin-waits of idle threads, "
                   "which inflate it many times on a busy machine")
    p.add_argument("--covid", action="store_true", help="also score covidqu_infection (folds by near-duplicate group)")
    p.add_argument("--quick", action="store_true", help="sanity run: resnet-tiny, 1 epoch, 32 px, a handful of images "
                   "per fold, tiny translators, marks of a few CPU-seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.epochs = "tiny", 1
    args.size = int(args.size or (32 if args.quick else 128))
    args.threads = args.threads or (1 if args.quick else None)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be at least 1")
    if args.size < 16:
        raise UserError(f"--size {args.size} is too small: use at least 16 px")
    families = [f.strip() for f in args.translators.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise UserError(f"unknown translator family {', '.join(bad)} in --translators: use {','.join(FAMILIES)}")
    args.families = list(dict.fromkeys(families))
    try:
        minutes = [float(m) for m in (args.minutes.split(",") if args.minutes else
                                      [str(v) for v in (QUICK_MINUTES if args.quick else [5, 10, 20])])]
    except ValueError:
        raise UserError(f"--minutes {args.minutes!r} is not a comma-separated list of numbers: e.g. --minutes 5,10,20") from None
    if not minutes or any(m <= 0 for m in minutes) or any(b <= a for a, b in zip(minutes, minutes[1:])):
        raise UserError(f"--minutes {args.minutes} must be positive and increasing: e.g. --minutes 5,10,20")
    args.minutes = minutes
    for fam in args.families:  # a bad override fails here, before anything is written
        mcfg, _ = translator_config(fam, FINDINGS, args)
        try:
            with torch.random.fork_rng(devices=[]):
                build(mcfg)
        except Exception as exc:  # a value of the wrong type or range
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise UserError(f"cannot build translator {fam} from its config ({first[:200]}): fix "
                            "--translator-overrides") from None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    size = args.size
    mask_cfg = mask_rule(compose([]))
    ls = load_lesion_set("nih_bbox", args.lesions, size=size)
    patients = sorted(set(ls.patient_ids), key=lambda s: int(s) if s.isdigit() else s)
    perm = np.random.default_rng(args.seed).permutation(len(patients))
    fold_of = {patients[j]: k % 2 for k, j in enumerate(perm)}
    fold = np.array([fold_of[pid] for pid in ls.patient_ids])
    x_real, y_real, dropped, real_labs = real_nih(args.real, set(ls.patient_ids), size,
                                                  limit=QUICK_REAL // 2 if args.quick else None, seed=args.seed)
    y_bbox = multi_hot(ls.labels)
    atlas = LungAtlasMaps(*lung_atlas(args.real, size=size))  # the whole-lung reference (mean JSRT lung mask)
    info = {"command": "python benchmarks/quality_localisation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "epochs": args.epochs, "seed": args.seed, "size": size, "mask_rule": mask_cfg,
            "quick": bool(args.quick), "cpu_time": "process CPU time (time.process_time: user + system, all threads)",
            "torch_threads": torch.get_num_threads(),
            "real_nih_images": len(x_real), "real_nih_dropped_overlapping_patients": dropped,
            "nih_bbox_images": len(ls), "nih_bbox_patients": len(patients), "lung_atlas_masks": atlas.n_masks, "folds": {}}
    records: dict[str, list[dict]] = {}
    aucs: dict[str, list] = {f: [] for f in FINDINGS}
    probs_all = np.zeros((len(ls), len(FINDINGS)), np.float32)
    real_ok = translator_ok(real_labs, FINDINGS)
    bbox_ok = translator_ok(ls.labels, FINDINGS)
    tr_sets: dict[int, Arrays] = {}
    tr_trained_on: dict[int, str] = {}
    all_scored = []
    for k in (0, 1):
        train_rows = np.flatnonzero(fold != k)
        score_rows = np.flatnonzero(fold == k)
        if args.quick:
            score_rows = score_rows[:QUICK_SCORED if args.families else 20]
            train_rows = train_rows[:QUICK_TRAIN_LESION]
        all_scored.append(score_rows)
        assert not set(ls.patient_ids[i] for i in train_rows) & set(ls.patient_ids[i] for i in score_rows)
        trained_on = f"cxr-real NIH minus nih_bbox patients + nih_bbox fold {1 - k}"
        train = Arrays(np.concatenate([x_real, ls.images[train_rows]]), np.concatenate([y_real, y_bbox[train_rows]]))
        cfg = {"model_name": args.model, "num_classes": len(FINDINGS), "in_chans": 1}
        model = create_classifier(**cfg, init_seed=args.seed)
        res = train_classifier(model, train, None, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               device=args.device, seed=args.seed, balanced=True, progress=False)
        ck = save_checkpoint(args.out / f"fold{k}" / "best.pt", model.eval().cpu(), model_cfg=cfg, classes=FINDINGS,
                             image_size=size, metrics={"train_seconds": res.train_seconds},
                             extra={"trained_on": trained_on})
        probs = probs_of(model, ls.images[score_rows])
        probs_all[score_rows] = probs
        sub = subset(ls, score_rows)
        sources = [RandomMaps(s) for s in args.random_seeds]
        for s, src in zip(args.random_seeds, sources):
            src.name = f"random (seed {s})"
        sources += [CamMaps(model, FINDINGS, variant=v, layer=args.layer, device=args.device) for v in ("gradcam", "gradcam_pp")]
        sources.append(atlas)
        r = localise(sub, sources, mask_cfg, n_examples=8 if k == 0 else 0, keep_records=True,
                     figure=args.out / "overlays_fold0.png" if k == 0 else None)
        for name, recs in r["box_records"].items():
            records.setdefault(name, []).extend(recs)
        # the translators' training set: the same images, minus those a translator cannot learn from
        t_x = np.concatenate([x_real[real_ok], ls.images[train_rows[bbox_ok[train_rows]]]])
        t_labs = [lab for lab, ok in zip(real_labs, real_ok) if ok] + [ls.labels[i] for i in train_rows if bbox_ok[i]]
        n_norm = sum(lab == (NO_FINDING,) for lab in t_labs)
        tr_sets[k] = Arrays(t_x, multi_hot(t_labs))
        tr_trained_on[k] = (f"cxr-real NIH minus nih_bbox patients ({int(real_ok.sum())} of {len(x_real)} images: No Finding, "
                            f"or only the 8 findings) + nih_bbox fold {1 - k} ({int(bbox_ok[train_rows].sum())} of "
                            f"{len(train_rows)} images, image labels only); {n_norm} No Finding, {len(t_labs) - n_norm} "
                            "with findings")
        info["folds"][k] = {"train_images": len(train), "train_nih_bbox_images": len(train_rows),
                            "scored_images": len(score_rows), "scored_boxes": int(len(sub.boxes)),
                            "train_seconds": res.train_seconds, "checkpoint": str(ck), "speed": r["speed"],
                            "classifier_trained_on": trained_on,
                            "translator_train_images": len(t_labs), "translator_train_normals": n_norm,
                            "translator_trained_on": tr_trained_on[k]}
        print(f"fold {k}: trained on {len(train)} images in {res.train_seconds:.0f} s; scored {len(score_rows)} images",
              flush=True)
    scored = np.flatnonzero(probs_all.any(1))
    for j, f in enumerate(FINDINGS):
        y = y_bbox[scored, j]
        aucs[f] = float(roc_auc_score(y, probs_all[scored, j])) if 0 < y.sum() < len(y) else None
    tables = {name: box_table(recs) for name, recs in records.items()}
    # the random control's mean and spread (population std over its seeds) per cell
    tables["random (mean of seeds)"] = random_mean(tables)
    info["trained_on"] = {"nih_bbox": {
        "classifier": "fold k: cxr-real NIH (nih_kcr2019_64px, nih_fullres) minus every nih_bbox patient + nih_bbox fold "
                      "1-k (image labels only); 8 outputs",
        "translators": "fold k: the classifier's images that are No Finding (the normals) or have only the 8 findings",
        "scored": "nih_bbox fold k (folds by patient): each box against the map of its finding",
        "folds": {k: {"classifier": info["folds"][k]["classifier_trained_on"],
                      "translators": info["folds"][k]["translator_trained_on"]} for k in (0, 1)}}}
    curves: dict = {}
    if args.families:
        rows = np.concatenate(all_scored)
        curves = curves_for("nih_bbox", subset(ls, rows), fold[rows], args.families, FINDINGS, tr_sets, args, mask_cfg,
                            tr_trained_on)
    covid = None
    if args.covid:
        covid = covid_part(args, mask_cfg, args.families, atlas)
        covid["boxes_random"] = random_mean(covid["boxes"])
        covid["masks_random"] = mask_mean(covid["masks"])
        info["trained_on"]["covidqu_infection"] = covid["trained_on"]

    lines = [f"Command: `{info['command']}`", "",
             f"**What trained on what** ({size} px, seed {args.seed}, two folds, every scored image scored once by "
             "the fold that did not see it):", "",
             f"- classifier ({args.model}, from scratch, {args.epochs} epochs, 8 outputs) of fold k: cxr-real NIH "
             f"images minus every nih_bbox patient ({len(x_real)} images; {dropped} dropped) + the nih_bbox images of "
             "fold 1-k, image labels only; scored on nih_bbox fold k (folds by patient)."]
    if args.families:
        lines.append(f"- translators ({', '.join(args.families)}) of fold k: the same images restricted to No Finding "
                     f"(the normals) and images with only the 8 findings: fold 0 {info['folds'][0]['translator_train_images']} "
                     f"({info['folds'][0]['translator_train_normals']} normal), fold 1 {info['folds'][1]['translator_train_images']} "
                     f"({info['folds'][1]['translator_train_normals']} normal) images; YAML configs"
                     + (" + --fewshot (DiffAugment translation,cutout,brightness,contrast, LeCam 0.1; Fixed-Point GAN "
                        "adv=bce, lambda_gp=0, lambda_r1=1, n_critic=1)" if args.fewshot else "")
                     + (f" + --translator-overrides {' '.join(args.translator_overrides)}" if args.translator_overrides else "")
                     + "; checkpoints at " + ", ".join(f"{m:g}" for m in args.minutes)
                     + " training CPU-minutes (process CPU time, all threads, scoring excluded); each mark scored with "
                       "the EMA generator healing to No Finding.")
    lines += ["", "Classifier AUC on the scored images (image labels, out of fold): "
              + ", ".join(f"{f} {fmt(a)}" for f, a in aucs.items()), ""]
    header = "| finding | boxes | source | " + " | ".join(h for _, h in COLS) + " |"
    lines += ["### nih_bbox: box protocol per finding", "", header, "|" + "---|" * (3 + len(COLS))]
    for f in [*FINDINGS, "mean"]:
        for name in ("random (mean of seeds)", "lung_atlas", "gradcam", "gradcam_pp"):
            t = tables[name].get(f)
            if t is not None:
                lines.append(box_row(f, name, t, spread=name.startswith("random")))
        for fam, c in curves.items():
            for m in c["marks"]:
                t = m["boxes"].get(f)
                if t is not None:
                    lines.append(box_row(f, f"{fam} @ {m['minutes']:g} CPU-min", t))
    if curves:
        lines += ["", "### nih_bbox: learning curves (mean of the 8 findings; steps per fold)", "",
                  "| family | CPU-min | steps fold 0 / 1 | IoBB>0.1 | IoBB>0.25 | IoBB>0.5 | IoU>0.25 | pointing |",
                  "|---|---|---|---|---|---|---|---|"]
        for fam, c in curves.items():
            for i, m in enumerate(c["marks"]):
                t = m["boxes"].get("mean", {})
                steps = " / ".join(str(c["folds"][k]["marks"][i]["step"]) for k in (0, 1))
                lines.append(f"| {fam} | {m['minutes']:g} | {steps} | " + " | ".join(
                    fmt(t.get(key)) for key in ("iobb@0.1", "iobb@0.25", "iobb@0.5", "iou@0.25", "pointing")) + " |")
        lines.append("")
        lines.append("Detection AUC: nih_bbox has no normal images, so the metrics give none there (see covidqu_infection).")
    if covid is not None:
        lines += ["", "### covidqu_infection (COVID-19 infection masks)", "",
                  f"Scored: {covid['n_scored']} covidqu images ({covid['n_scored_lesion']} COVID, {covid['n_scored_normal']} "
                  f"normal) in two folds by near-duplicate group ({covid['n_groups']} groups). Fold k's classifier "
                  f"({args.model}, 1 output) and translators trained on: fold 0: {covid['folds'][0]['trained_on']}; "
                  f"fold 1: {covid['folds'][1]['trained_on']}. Classifier AUC per fold (COVID vs normal): "
                  + ", ".join(fmt(a) for a in covid["classifier_auc_per_fold"]) + ".", "",
                  "| source | Dice | IoU | PoI | det. AUC | IoBB>0.1 | IoBB>0.25 | IoBB>0.5 | pointing |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def covid_row(name: str, mk: dict, bx: dict, spread: bool = False) -> str:
            def c(d, k):
                v = d.get(k)
                return "-" if v is None else (f"{v:.3f} ± {d[k + '_std']:.3f}" if spread and d.get(k + "_std") is not None else f"{v:.3f}")
            return (f"| {name} | " + " | ".join(c(mk, k) for k, _ in MASK_COLS) + " | "
                    + " | ".join(c(bx, k) for k in ("iobb@0.1", "iobb@0.25", "iobb@0.5", "pointing")) + " |")

        lines.append(covid_row("random (mean of seeds)", covid["masks_random"].get("Pneumonia", {}),
                               covid["boxes_random"].get("mean", {}), spread=True))
        for name in ("lung_atlas", "gradcam", "gradcam_pp"):
            lines.append(covid_row(name, covid["masks"].get(name, {}).get("Pneumonia", {}), covid["boxes"].get(name, {}).get("mean", {})))
        for fam, c in covid["translators"].items():
            for m in c["marks"]:
                lines.append(covid_row(f"{fam} @ {m['minutes']:g} CPU-min", m["masks"].get("Pneumonia", {}), m["boxes"].get("mean", {})))
    if curves:
        levels = {"random": tables["random (mean of seeds)"]["mean"]["iobb@0.25"],
                  "gradcam": tables["gradcam"]["mean"]["iobb@0.25"], "gradcam_pp": tables["gradcam_pp"]["mean"]["iobb@0.25"]}
        info["figure"] = str(curve_figure(args.out / "curves.png", curves, levels, covid))
        lines += ["", f"Figure: `{Path(info['figure']).name}` (box accuracy at T(IoBB) > 0.25 vs training CPU-minutes)."]
    text = "\n".join(lines)
    print(text)
    info.update({"classifier_auc": aucs, "tables": tables, "translators": curves,
                 "seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - cpu_start})
    if covid is not None:
        info["covidqu_infection"] = covid
    (args.out / "tables.md").write_text(text + "\n")
    (args.out / "metrics.json").write_text(json.dumps(info, indent=1, default=str))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
