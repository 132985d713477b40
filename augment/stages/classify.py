"""`augment classify`: timm classifiers on real (+ synthetic) data, per-class AUC over seeds.

Without ``--synthetic`` it trains the real-only baseline; with ``--synthetic DIR ...`` real plus
synthetic batches at ratio r, synthetic loss weight xi and pseudo-label threshold t. Evaluation is
on the held-out test split (by patient), with decision thresholds chosen on validation.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from augment import runtime
from augment.config import build, to_dict
from augment.data.labels import NO_FINDING
from augment.data.sources import load_table
from augment.data.table import DataTable, XrayDataset
from augment.errors import UserError
from augment.stages.common import markdown_table, resolve_classes, versions

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available: use classify.device=auto or cpu")
    return torch.device(name)


def limited_train_indices(table: DataTable, cfg: dict) -> np.ndarray:
    """Train rows, keeping at most ``classify.limit_positives[c]`` positives of each limited class.

    The subset is drawn once from ``classify.limit_seed`` (not the training seed), so every model of
    a run (generators, pseudo-labeller, baseline and augmented classifiers of every seed) sees the
    same real images: the synthetic data cannot smuggle in real positives a baseline never saw.
    """
    ccfg = cfg["classify"]
    idx = table.indices("train")
    limits = dict(ccfg.get("limit_positives") or {})
    if not limits:
        return idx
    rng = np.random.default_rng([int(ccfg.get("limit_seed") or 0), 7])
    drop: set[int] = set()
    for name, cap in limits.items():
        col = table.column(resolve_classes([name])[0])[idx]
        pos = idx[col == 1]
        if len(pos) > int(cap):
            drop.update(rng.choice(pos, size=len(pos) - int(cap), replace=False).tolist())
    return np.asarray([i for i in idx if i not in drop], dtype=np.int64)


def selected_rows(table: DataTable, classes: list[str], negatives: str):
    """A filter of row indices: ``all`` keeps every image (a class's negatives are all the others);
    ``no_finding`` keeps images positive for a selected class or labelled No Finding, so the task is
    "finding vs No Finding" (images with only other findings are left out)."""
    if negatives == "all":
        return lambda idx: idx
    if negatives != "no_finding":
        raise UserError(f"classify.negatives={negatives}: choose all or no_finding")
    if NO_FINDING not in table.labelled_classes():
        raise UserError(f"classify.negatives=no_finding: data={table.source} has no {NO_FINDING} label; use all")
    ok = np.asarray(table.column(NO_FINDING) == 1)
    for c in classes:
        ok |= np.asarray(table.column(c) == 1)
    return lambda idx: np.asarray([i for i in idx if ok[i]], dtype=np.int64)


def open_synthetic(dirs: list[str], classes: list[str], threshold: float | None, image_size: int) -> Any:
    """Concatenated synthetic sets over ``classes``; one-line errors for bad folders."""
    from torch.utils.data import ConcatDataset

    from augment.data.synthetic import SyntheticDataset

    sets = []
    for d in dirs:
        try:
            ds = SyntheticDataset(d, classes=classes, threshold=threshold, with_masks=False)
        except ValueError as exc:
            raise UserError(f"{exc}: pass a folder written by `augment generate` to --synthetic") from None
        card_classes = [c for c in (ds.card.get("classes") or []) if c != NO_FINDING]
        if card_classes and not set(card_classes) & set(classes):
            raise UserError(f"synthetic set {d} has classes {', '.join(card_classes)}, none of {', '.join(classes)}: "
                            "generate the classes you classify (--classes)")
        if len(ds) and int(ds[0]["image"].shape[-1]) != image_size:
            raise UserError(f"synthetic set {d} is {int(ds[0]['image'].shape[-1])} px but data.image_size={image_size}: "
                            "generate at the data's size or set data.image_size")
        sets.append(ds)
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def train_one(payload: dict, on_epoch: Any = None) -> dict:
    """One seed: train (or load) a classifier, evaluate on test. A Ray work unit (plain dict in/out).

    ``on_epoch(epoch, metrics)`` (in-process only, e.g. a search's pruning callback) is called after
    every validation with ``metrics["val_mean_auc"]``; an exception it raises stops training and
    propagates (after the best weights are restored)."""
    from classifiers.evaluate import choose_thresholds, evaluate, predict
    from classifiers.model import load_classifier, save_checkpoint
    from classifiers.train import train_classifier

    cfg, seed, out = payload["cfg"], int(payload["seed"]), Path(payload["out"])
    ccfg = cfg["classify"]
    classes = payload["classes"]
    table = load_table(cfg["data"], show_progress=False)
    device = pick_device(str(ccfg["device"]))
    keep = selected_rows(table, classes, str(ccfg.get("negatives") or "all"))
    train_idx = keep(limited_train_indices(table, cfg))
    train_ds = XrayDataset(table, train_idx, classes)
    val_ds = XrayDataset(table, keep(table.indices("val")), classes)
    test_ds = XrayDataset(table, keep(table.indices("test")), classes)
    ckpt = out / f"seed{seed}" / "best.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"seed": seed, "n_train_real": len(train_ds)}
    if ccfg.get("checkpoint"):
        try:
            model, meta = load_classifier(ccfg["checkpoint"])
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot load classify.checkpoint: {exc}") from None
        if list(meta.get("classes") or []) != classes:
            raise UserError(f"checkpoint classes {meta.get('classes')} differ from the data's {classes}: "
                            "pass --classes matching the checkpoint or train a new one")
        model.to(device)
    else:
        model_cfg = dict(cfg["classifier"])
        model = build({**model_cfg, "num_classes": len(classes), "init_seed": seed})
        sampler, ds = None, train_ds
        if payload.get("synthetic"):
            from augment.data.mixing import MixedBatchSampler, MixedDataset

            syn = open_synthetic(payload["synthetic"], classes, ccfg.get("threshold"), table.image_size)
            ds = MixedDataset(train_ds, syn, xi=float(ccfg["xi"]))
            weights = None
            if bool(ccfg["balanced"]):  # the real part stays class-balanced, as in the real-only baseline
                from classifiers.data import dataset_labels
                from classifiers.train import balanced_sample_weights

                weights = balanced_sample_weights(dataset_labels(train_ds))
            sampler = MixedBatchSampler(len(train_ds), len(syn), batch_size=int(ccfg["batch_size"]),
                                        ratio=float(ccfg["ratio"]), generator=torch.Generator().manual_seed(seed),
                                        real_weights=weights)
            info["n_train_synthetic"] = len(syn)
        result = train_classifier(
            model, ds, val_ds, epochs=int(ccfg["epochs"]), batch_size=int(ccfg["batch_size"]), lr=float(ccfg["lr"]),
            weight_decay=float(ccfg["weight_decay"]), warmup_frac=float(ccfg["warmup_frac"]), device=device, seed=seed,
            balanced=bool(ccfg["balanced"]) and sampler is None, patience=ccfg.get("patience"), ckpt_path=ckpt,
            ckpt_meta={"model_cfg": {**model_cfg, "num_classes": len(classes)}, "classes": classes,
                       "image_size": table.image_size, "extra": {"data_fingerprint": table.fingerprint, "seed": seed}},
            num_workers=int(ccfg["num_workers"]), amp=bool(ccfg["amp"]), sampler=sampler,
            progress=bool(cfg.get("progress", True)), on_epoch=on_epoch,
        )
        info.update(best_epoch=result.best_epoch, best_val_auc=result.best_val_auc,
                    train_seconds=result.train_seconds, images_per_second=result.images_per_second)
        if not ckpt.is_file():  # no validation improvement was ever recorded: keep the final weights
            save_checkpoint(ckpt, model, model_cfg={**model_cfg, "num_classes": len(classes)}, classes=classes,
                            image_size=table.image_size, metrics={"best_val_auc": result.best_val_auc})
    val = predict(model, val_ds, device=device)
    thresholds = choose_thresholds(val.probs, val.labels)
    test = predict(model, test_ds, device=device)
    metrics = evaluate(test.probs, test.labels, classes, thresholds)
    info.update(test=metrics, val_mean_auc=evaluate(val.probs, val.labels, classes)["mean_auc"],
                seconds=time.perf_counter() - t0, checkpoint=str(ckpt))
    np.savez_compressed(out / f"seed{seed}" / "test_predictions.npz", probs=test.probs, labels=test.labels)
    return info


def summarize(per_seed: list[dict], classes: list[str]) -> dict:
    """Mean and standard deviation over seeds of per-class AUC, mean AUC, accuracy."""
    def stats(values: list[float | None]) -> dict:
        v = [x for x in values if x is not None and not math.isnan(x)]
        return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None),
                "values": values, "n": len(v)}

    out = {"auc": {c: stats([s["test"]["auc"][c] for s in per_seed]) for c in classes},
           "mean_auc": stats([s["test"]["mean_auc"] for s in per_seed]),
           "accuracy": {c: stats([s["test"]["per_class"][c]["accuracy"] for s in per_seed]) for c in classes},
           "f1": {c: stats([s["test"]["per_class"][c]["f1"] for s in per_seed]) for c in classes}}
    undefined = {c: s["test"]["per_class"][c]["undefined"] for s in per_seed for c in classes
                 if s["test"]["per_class"][c].get("undefined")}
    if undefined:
        out["undefined"] = undefined
    return out


def roc_plot(per_seed: list[dict], classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.2), squeeze=False)
    for ax, c in zip(axes[0], classes):
        for s in per_seed:
            roc = s["test"]["per_class"][c]["roc"]
            auc = s["test"]["auc"][c]
            if roc["fpr"]:
                ax.plot(roc["fpr"], roc["tpr"], lw=1, label=f"seed {s['seed']}: {auc:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(c, fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def classify(cfg: DictConfig, out: Path) -> dict:
    """The ``augment classify`` stage."""
    ccfg = cfg.classify
    resolve_classes(cfg.classes)
    seeds = [int(s) for s in ccfg.seeds]
    if not seeds:
        raise UserError("no seeds: pass --seeds 0,1,2")
    synthetic = [str(Path(d).expanduser().resolve()) for d in (ccfg.synthetic or [])]
    for d in synthetic:
        if not Path(d).is_dir():
            raise UserError(f"--synthetic folder {d} does not exist: pass a folder written by `augment generate`")
        if not (Path(d) / "labels.csv").is_file():
            raise UserError(f"--synthetic folder {d} has no labels.csv: it is not a synthetic dataset folder")
    t = ccfg.threshold
    if t is not None and not 0 < float(t) < 1:
        raise UserError(f"classify.threshold={t} is outside (0, 1): pick a pseudo-label threshold like 0.75")
    table = load_table(cfg.data, show_progress=cfg.progress)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    for split in ("train", "val", "test"):
        if len(table.indices(split)) == 0:
            raise UserError(f"the {split} split of data={table.source} is empty: use more data or adjust data.split")
    if synthetic:
        open_synthetic(synthetic, classes, t, table.image_size)  # validate before any training
    base = to_dict(cfg)
    payloads = [{"cfg": base, "seed": s, "out": str(out.resolve()), "classes": classes, "synthetic": synthetic} for s in seeds]
    mode = "augmented" if synthetic else "baseline"
    print(f"classify ({mode}): {cfg.classifier.model_name} on data={table.source} {table.image_size} px, "
          f"classes {', '.join(classes)}, seeds {seeds}")
    t0 = time.perf_counter()
    rt = cfg.runtime if bool(ccfg.parallel) and len(seeds) > 1 else {"name": "inline"}
    per_seed = runtime.run_all("augment.stages.classify:train_one", payloads, rt)
    summary = summarize(per_seed, classes)
    plot = roc_plot(per_seed, classes, out / "roc.png", f"{mode}: test ROC per class")
    rows = [[c, _fmt(summary["auc"][c]), *[_num(s["test"]["auc"][c]) for s in per_seed]] for c in classes]
    rows.append(["mean AUC", _fmt(summary["mean_auc"]), *[_num(s["test"]["mean_auc"]) for s in per_seed]])
    table_md = markdown_table(rows, ["class", "AUC mean ± sd", *[f"seed {s}" for s in seeds]])
    print(table_md)
    (out / "auc.md").write_text(table_md + "\n")
    print(f"ROC plot: {plot}")
    return {"mode": mode, "classes": classes, "seeds": seeds, "model": cfg.classifier.model_name,
            "image_size": table.image_size, "data": table.source, "data_fingerprint": table.fingerprint,
            "synthetic": synthetic, "summary": summary, "per_seed": per_seed,
            "seconds": time.perf_counter() - t0, "versions": versions()}


def _num(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def _fmt(s: dict) -> str:
    if s["mean"] is None:
        return "undefined"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"
