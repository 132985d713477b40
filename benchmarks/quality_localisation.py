"""NIH boxes at 128 px (Wang et al. 2017 protocol): random-map control vs Grad-CAM / Grad-CAM++ of a
classifier trained on real NIH images, with no scored image (or patient) seen in training.

What trains on what (two folds, so every ``nih_bbox`` image is scored exactly once):

- ``nih_bbox``'s 361 patients are split in two folds by a seeded permutation (``--seed``).
- The classifier of fold k (timm ``--model``, from scratch, 1 channel, 128 px, 8 outputs: the 8 box
  findings, multi-label) trains on the ChestX-ray14 images of ``cxr-real`` (``nih_kcr2019_64px``,
  upsampled from 64 px, and ``nih_fullres``) **minus every patient that has an image in nih_bbox**,
  plus the nih_bbox images of the *other* fold (their image-level labels only, never their boxes).
- It is scored on the nih_bbox images of fold k: each box against the map of that box's finding.

The random control is scored with ``--random-seeds`` seeds (its spread), the CAMs with the fold
models of one training seed.  The tables print per finding and their mean (unweighted over the
findings, as Wang et al.'s "mean of 8"); ``--out`` keeps the checkpoints, ``metrics.json`` and
``tables.md``.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/quality_localisation.py --out runs/loc128 --epochs 8
    python benchmarks/quality_localisation.py --quick --out /tmp/locq      # minutes-long sanity run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.config import compose  # noqa: E402
from augment.data.labels import canonical  # noqa: E402
from augment.data.lesions import load_lesion_set, subset  # noqa: E402
from augment.jobs.masks import mask_rule  # noqa: E402
from augment.jobs.saliency import CamMaps, RandomMaps, localise  # noqa: E402
from augment.metrics.localisation import box_table  # noqa: E402
from classifiers.model import create_classifier, save_checkpoint  # noqa: E402
from classifiers.train import train_classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
COLS = [("iobb@0.1", "IoBB>0.1"), ("iobb@0.25", "IoBB>0.25"), ("iobb@0.5", "IoBB>0.5"), ("iou@0.1", "IoU>0.1"),
        ("iou@0.25", "IoU>0.25"), ("iou@0.5", "IoU>0.5"), ("pointing", "pointing")]


class Arrays(Dataset):
    classes = FINDINGS

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels.astype(np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.images[i][None].copy()), "labels": torch.from_numpy(self.labels[i])}


def multi_hot(labels: list[tuple[str, ...]]) -> np.ndarray:
    return np.array([[float(f in lab) for f in FINDINGS] for lab in labels], dtype=np.float32)


def real_nih(real_root: Path, exclude_patients: set[str]) -> tuple[np.ndarray, np.ndarray, int]:
    df = pd.read_csv(real_root / "labels.csv", dtype=str, keep_default_na=False)
    nih = df[df["file"].str.startswith(("images/nih_kcr2019_64px/", "images/nih_fullres/")) & (df["labels"] != "")]
    dropped = int(nih["patient_id"].isin(exclude_patients).sum())
    nih = nih[~nih["patient_id"].isin(exclude_patients)]
    labs = [tuple(canonical(t) for t in cell.split("|")) for cell in nih["labels"]]
    imgs = np.stack([np.asarray(Image.open(real_root / f).convert("L").resize((128, 128), Image.Resampling.LANCZOS))
                     for f in nih["file"]])
    return imgs, multi_hot(labs), dropped


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lesions", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-lesions")
    p.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-real")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="fold split and training seed")
    p.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layer", default=None, help="CAM layer (default: the last conv stage)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="1 epoch, resnet-tiny, 40 scored images")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.epochs = "tiny", 1
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    mask_cfg = mask_rule(compose([]))
    ls = load_lesion_set("nih_bbox", args.lesions, size=128)
    patients = sorted(set(ls.patient_ids), key=lambda s: int(s) if s.isdigit() else s)
    perm = np.random.default_rng(args.seed).permutation(len(patients))
    fold_of = {patients[j]: k % 2 for k, j in enumerate(perm)}
    fold = np.array([fold_of[pid] for pid in ls.patient_ids])
    x_real, y_real, dropped = real_nih(args.real, set(ls.patient_ids))
    y_bbox = multi_hot(ls.labels)
    info = {"command": "python benchmarks/quality_localisation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "epochs": args.epochs, "seed": args.seed, "mask_rule": mask_cfg,
            "real_nih_images": len(x_real), "real_nih_dropped_overlapping_patients": dropped,
            "nih_bbox_images": len(ls), "nih_bbox_patients": len(patients), "folds": {}}
    records: dict[str, list[dict]] = {}
    aucs: dict[str, list] = {f: [] for f in FINDINGS}
    probs_all = np.zeros((len(ls), len(FINDINGS)), np.float32)
    for k in (0, 1):
        train_rows = np.flatnonzero(fold != k)
        score_rows = np.flatnonzero(fold == k)
        if args.quick:
            score_rows = score_rows[:20]
        assert not set(ls.patient_ids[i] for i in train_rows) & set(ls.patient_ids[i] for i in score_rows)
        train = Arrays(np.concatenate([x_real, ls.images[train_rows]]), np.concatenate([y_real, y_bbox[train_rows]]))
        cfg = {"model_name": args.model, "num_classes": len(FINDINGS), "in_chans": 1}
        model = create_classifier(**cfg, init_seed=args.seed)
        res = train_classifier(model, train, None, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               device=args.device, seed=args.seed, balanced=True, progress=False)
        ck = save_checkpoint(args.out / f"fold{k}" / "best.pt", model.eval().cpu(), model_cfg=cfg, classes=FINDINGS,
                             image_size=128, metrics={"train_seconds": res.train_seconds},
                             extra={"trained_on": f"cxr-real NIH minus nih_bbox patients + nih_bbox fold {1 - k}"})
        with torch.no_grad():
            x = torch.from_numpy(ls.images[score_rows][:, None]).float() / 127.5 - 1
            probs = torch.sigmoid(torch.cat([model(x[i:i + 64]) for i in range(0, len(x), 64)])).numpy()
        probs_all[score_rows] = probs
        sub = subset(ls, score_rows)
        sources = [RandomMaps(s) for s in args.random_seeds]
        for s, src in zip(args.random_seeds, sources):
            src.name = f"random (seed {s})"
        sources += [CamMaps(model, FINDINGS, variant=v, layer=args.layer, device=args.device) for v in ("gradcam", "gradcam_pp")]
        r = localise(sub, sources, mask_cfg, n_examples=8 if k == 0 else 0, keep_records=True,
                     figure=args.out / "overlays_fold0.png" if k == 0 else None)
        for name, recs in r["box_records"].items():
            records.setdefault(name, []).extend(recs)
        info["folds"][k] = {"train_images": len(train), "train_nih_bbox_images": len(train_rows),
                            "scored_images": len(score_rows), "scored_boxes": int(len(sub.boxes)),
                            "train_seconds": res.train_seconds, "checkpoint": str(ck), "speed": r["speed"]}
        print(f"fold {k}: trained on {len(train)} images in {res.train_seconds:.0f} s; scored {len(score_rows)} images",
              flush=True)
    scored = np.flatnonzero(probs_all.any(1))
    for j, f in enumerate(FINDINGS):
        y = y_bbox[scored, j]
        aucs[f] = float(roc_auc_score(y, probs_all[scored, j])) if 0 < y.sum() < len(y) else None
    tables = {name: box_table(recs) for name, recs in records.items()}
    rnd = [n for n in tables if n.startswith("random")]
    # the random control's mean and spread (population std over its seeds) per cell
    tables["random (mean of seeds)"] = {
        f: {k: float(np.mean([tables[n][f][k] for n in rnd])) for k, _ in COLS} | {
            f"{k}_std": float(np.std([tables[n][f][k] for n in rnd])) for k, _ in COLS} | {"n_boxes": tables[rnd[0]][f]["n_boxes"]}
        for f in tables[rnd[0]]}
    lines = [f"Command: `{info['command']}`", "",
             "Classifier AUC on the scored images (image labels, out of fold): "
             + ", ".join(f"{f} {fmt(a)}" for f, a in aucs.items()), ""]
    header = "| finding | boxes | source | " + " | ".join(h for _, h in COLS) + " |"
    lines += [header, "|" + "---|" * (3 + len(COLS))]
    for f in [*FINDINGS, "mean"]:
        for name in ("random (mean of seeds)", "gradcam", "gradcam_pp"):
            t = tables[name].get(f)
            if t is None:
                continue
            cells = [f"{t[k]:.3f} ± {t[k + '_std']:.3f}" if name.startswith("random") else fmt(t[k]) for k, _ in COLS]
            lines.append(f"| {f} | {t['n_boxes']} | {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    info.update({"classifier_auc": aucs, "tables": tables, "seconds": time.perf_counter() - t_start})
    (args.out / "tables.md").write_text(text + "\n")
    (args.out / "metrics.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
