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

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig

from augment import runtime
from augment.common import markdown_table, resolve_classes, versions
from augment.config import to_dict
from augment.data.sources import load_table
from augment.errors import UserError
from augment.jobs.classifier import open_synthetic

log = logging.getLogger(__name__)


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
    matplotlib.use("Agg")  # files only, never a window
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
    try:
        seeds = [int(s) for s in ccfg.seeds]
    except (TypeError, ValueError):
        raise UserError(f"--seeds {','.join(map(str, ccfg.seeds))}: seeds are integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise UserError("no seeds: pass --seeds 0,1,2")
    for key in ("epochs", "batch_size"):
        value = ccfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"classify.{key}={value}: use a whole number >= 1 (e.g. classify.{key}=5)")
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
    per_seed = runtime.run_all("augment.jobs.classifier:train_seed", payloads, rt)
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
