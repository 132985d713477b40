"""`augment classify`: timm classifiers on real (+ synthetic) data, per-class AUC over seeds.

Without ``--synthetic`` it trains the real-only baseline; with ``--synthetic DIR ...`` real plus
synthetic batches at ratio r, synthetic loss weight xi and pseudo-label threshold t. Evaluation is
on the held-out test split (by patient), with decision thresholds chosen on validation (stored in
every checkpoint).

With ``classify.arms`` (``--arms real,classic,oversample,synthetic,synthetic+classic``) it runs the
fair comparison of :mod:`augment.arms` instead: every arm x seed (x low-data point of
``classify.curve``) is a work unit at the same step budget, and one table gives per-class test AUC
per arm and paired differences with 95 % intervals over seeds. With ``classify.checkpoint``
(``--checkpoint RUN_OR_PT``) it trains nothing and scores a trained model on ``data=...``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from omegaconf import DictConfig

from augment import arms as armlib
from augment import runtime
from augment.common import markdown_table, resolve_classes, versions
from augment.config import to_dict
from augment.data.labels import NO_FINDING
from augment.data.sources import load_table
from augment.errors import UserError
from augment.jobs.classifier import limited_train_indices, open_synthetic, selected_rows, slot_share

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
    arms = armlib.parse_arms(ccfg.arms)
    curve = armlib.parse_curve(ccfg.curve)
    if ccfg.checkpoint:
        if arms or curve:
            raise UserError("--checkpoint scores a trained model: drop --arms / classify.curve (they train)")
        return score_checkpoint(cfg, out)
    if curve and not arms:
        raise UserError("classify.curve needs arms to compare: add --arms real,synthetic (or classify.arms=[...])")
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
    if arms:
        return run_arms(cfg, out, arms=arms, curve=curve, seeds=seeds, synthetic=synthetic, table=table, classes=classes)
    if synthetic:
        open_synthetic(synthetic, classes, t, table.image_size)  # validate before any training
    base = to_dict(cfg)
    limited_train_indices(table, base)  # a limit above the available positives: one line before any training
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


def _steps(cfg: dict, table, classes: list[str], k_real: int) -> int:
    """The step budget: ``classify.steps``, or epochs x ceil(real train images / real images per step)."""
    ccfg = cfg["classify"]
    if ccfg["steps"] is not None:
        return int(ccfg["steps"])
    keep = selected_rows(table, classes, str(ccfg["negatives"]))
    n = len(keep(limited_train_indices(table, cfg)))
    return int(ccfg["epochs"]) * max(1, math.ceil(n / k_real))


def run_arms(cfg: DictConfig, out: Path, *, arms: list[str], curve: list[int | None], seeds: list[int],
             synthetic: list[str], table, classes: list[str]) -> dict:
    """The fair comparison (see :mod:`augment.arms`); returns the metrics (also what ``augment run`` reads).

    Metrics: ``mode: "arms"``, ``arms``, ``seeds``, ``classes``, ``steps`` ({arm: {seed: optimizer
    steps}}; with a curve {point: {arm: {seed: steps}}}), ``comparison`` (:func:`augment.arms.compare`;
    with a curve ``curve``: {point: compare}), ``table`` (markdown; with a curve one per point),
    ``units`` (every unit's result) and the budget (``budget``)."""
    ccfg = cfg.classify
    steps_cfg = ccfg.steps
    if steps_cfg is not None and (not isinstance(steps_cfg, int) or isinstance(steps_cfg, bool) or steps_cfg < 1):
        raise UserError(f"classify.steps={steps_cfg}: use a whole number >= 1 (e.g. classify.steps=500) or null")
    need_syn = [a for a in arms if armlib.SPEC[a][0] == "synthetic"]
    if need_syn and not synthetic:
        raise UserError(f"arm {need_syn[0]} needs synthetic images: pass --synthetic DIR (a folder written by `augment generate`)")
    shares: dict[str, float] = {c: 1.0 for c in classes}
    generated = list(classes)
    if synthetic:
        syn = open_synthetic(synthetic, classes, ccfg.threshold, table.image_size)  # validate before any training
        labels = np.asarray(syn.label_matrix() if hasattr(syn, "label_matrix")
                            else np.concatenate([d.label_matrix() for d in syn.datasets]))
        counts = {c: float(np.nansum(labels[:, k] == 1)) for k, c in enumerate(classes)}
        generated = [c for c in classes if counts[c] > 0] or list(classes)
        shares = {c: counts[c] or 1.0 for c in generated}
    base = to_dict(cfg)
    k_real, k_slot = slot_share(int(ccfg.batch_size), float(ccfg.ratio))
    points: list[int | None] = curve or ["config"]  # type: ignore[list-item]
    keep = selected_rows(table, classes, str(ccfg.negatives))
    point_cfgs: dict[str, dict] = {}
    for point in points:
        pcfg = copy.deepcopy(base)
        if point != "config":
            pcfg["classify"]["limit_positives"] = {} if point is None else {c: int(point) for c in classes}
        rows = keep(limited_train_indices(table, pcfg))  # limit above the available count: one line here
        if "oversample" in arms:
            for c in generated:
                if int((table.column(c)[rows] == 1).sum()) == 0:
                    raise UserError(f"arm oversample: the train split has no {c} positive to repeat: "
                                    f"drop the oversample arm or the class {c}")
        for split in ("val", "test"):
            if len(keep(table.indices(split))) == 0:
                raise UserError(f"the {split} split of data={table.source} is empty: use more data or adjust data.split")
        name = "config" if point == "config" else armlib.point_name(point)
        point_cfgs[name] = {"cfg": pcfg, "steps": _steps(pcfg, table, classes, k_real), "n_real": len(rows)}
    units = []
    for name, pc in point_cfgs.items():
        for arm in arms:
            for seed in seeds:
                folder = out / (arm if name == "config" else Path(f"positives_{name}") / arm) / f"seed{seed}"
                units.append({"cfg": pc["cfg"], "seed": seed, "arm": arm, "point": name, "steps": pc["steps"],
                              "out": str(folder.resolve())})
    payload = {"classes": classes, "synthetic": synthetic, "generated": generated, "shares": shares}
    budget = {n: {"steps": pc["steps"], "batch_size": int(ccfg.batch_size), "real_per_step": k_real,
                  "slot_per_step": k_slot, "n_real_train": pc["n_real"]} for n, pc in point_cfgs.items()}
    print(f"classify (arms {', '.join(arms)}): {cfg.classifier.model_name} on data={table.source} {table.image_size} px, "
          f"classes {', '.join(classes)}, seeds {seeds}; "
          + "; ".join(f"{'' if n == 'config' else f'{n} positives: '}{b['steps']} steps x ({k_real} real + "
                      f"{k_slot} slot) images" for n, b in budget.items()))
    t0 = time.perf_counter()
    results = _run_units(cfg, payload, units)
    order = {(u["point"], u["arm"], u["seed"]): i for i, u in enumerate(units)}
    results.sort(key=lambda r: order[(r["point"], r["arm"], r["seed"])])
    comparisons, tables, steps = {}, {}, {}
    for name in point_cfgs:
        mine = [r for r in results if r["point"] == name]
        comparisons[name] = armlib.compare(mine, arms, classes)
        tables[name] = armlib.table(comparisons[name], arms, classes)
        steps[name] = {a: {str(k): v for k, v in comparisons[name]["arms"][a]["steps"].items()} for a in arms}
    head = (f"budget: batch {int(ccfg.batch_size)} = {k_real} real + {k_slot} slot (ratio {float(ccfg.ratio)}, "
            f"xi {float(ccfg.xi)}); real/classic leave the slot empty")
    parts = []
    for name, tab in tables.items():
        title = "" if name == "config" else f"### {name} real positives per class\n\n"
        parts.append(f"{title}{budget[name]['steps']} optimizer steps per arm and seed; {head}\n\n{tab}")
    text = "\n\n".join(parts)
    print(text)
    (out / "arms.md").write_text(text + "\n")
    metrics: dict[str, Any] = {"mode": "arms", "arms": arms, "seeds": seeds, "classes": classes,
                               "model": cfg.classifier.model_name, "image_size": table.image_size, "data": table.source,
                               "data_fingerprint": table.fingerprint, "synthetic": synthetic,
                               "oversample_classes": generated, "units": results,
                               "seconds": time.perf_counter() - t0, "versions": versions()}
    if curve:
        plot = armlib.curve_plot(comparisons, arms, classes, out / "curve.png",
                                 f"test AUC vs real positives ({cfg.classifier.model_name}, {table.image_size} px)")
        print(f"curve: {plot}")
        metrics.update(curve=comparisons, table=tables, steps=steps, budget=budget, points=list(point_cfgs))
    else:
        metrics.update(comparison=comparisons["config"], table=tables["config"], steps=steps["config"],
                       budget=budget["config"])
    return metrics


def _run_units(cfg: DictConfig, payload: dict, units: list[dict]) -> list[dict]:
    """Every unit, in parallel workers where the runtime and the cores allow (one by one inline)."""
    rt = to_dict(cfg.runtime)
    if not bool(cfg.classify.parallel) or len(units) < 2 or runtime.is_inline(rt):
        from augment.jobs.classifier import train_arm

        return [train_arm({**payload, **u}) for u in units]
    res = runtime.resources(rt)
    gpw = runtime.gpus_per_worker(rt)
    if res["GPU"] > 0 and gpw > 0:
        workers = int(res["GPU"] / gpw)
    else:
        workers = int(res["CPU"] / max(float(rt["cpus_per_worker"]), 1e-6))
    workers = max(1, min(len(units), workers))
    pool = runtime.StatefulPool("augment.jobs.classifier:ArmRunner", payload, workers, rt)
    try:
        return list(pool.map(units))
    finally:
        pool.close()


def score_checkpoint(cfg: DictConfig, out: Path) -> dict:
    """``augment classify --checkpoint RUN_OR_PT data=...``: score trained models, train nothing.

    RUN_OR_PT: one ``best.pt``, or a classify run folder (every ``seed*/best.pt`` below it; an arms run
    gives one group per arm). Every labelled image of the data is scored (with ``data.split_column``
    only the rows whose column says ``test``), at the thresholds chosen on the run's validation split
    (stored in the checkpoint; 0.5 for a checkpoint written before they were stored).
    """
    from classifiers.evaluate import evaluate, predict
    from classifiers.model import load_classifier

    from augment.data.table import XrayDataset
    from augment.jobs.classifier import pick_device

    src = Path(str(cfg.classify.checkpoint)).expanduser()
    groups: dict[str, list[Path]] = {}
    if src.is_file():
        groups["model"] = [src]
    elif src.is_dir():
        found = sorted(src.rglob("best.pt"))
        if not found:
            raise UserError(f"--checkpoint {src} holds no best.pt: pass a classify run folder or a best.pt file")
        for f in found:
            rel = f.parent.relative_to(src)
            key = str(rel.parent) if rel.name.startswith("seed") else str(rel)
            groups.setdefault("model" if key in (".", "") else key, []).append(f)
    else:
        raise UserError(f"--checkpoint {src} does not exist: pass a classify run folder or a best.pt file")
    loaded = {}
    for key, files in groups.items():
        for f in files:
            try:
                loaded[f] = load_classifier(f)
            except (FileNotFoundError, ValueError, RuntimeError) as exc:
                raise UserError(f"cannot load --checkpoint {f}: {str(exc).splitlines()[0]}") from None
    table = load_table(cfg.data, show_progress=cfg.progress)
    first = next(iter(loaded.values()))[1]
    classes = [str(c) for c in first.get("classes") or []]
    present = table.labelled_classes()
    lacking = [c for c in classes if c not in present]
    if lacking:
        raise UserError(f"the checkpoint's classes {', '.join(lacking)} are not labelled in data={table.source} "
                        f"(it labels {', '.join(c for c in present if c != NO_FINDING) or 'none'}): score data with these classes")
    for f, (_, meta) in loaded.items():
        if [str(c) for c in meta.get("classes") or []] != classes:
            raise UserError(f"--checkpoint {f} has classes {meta.get('classes')}, others {classes}: score one run at a time")
        if int(meta.get("image_size") or table.image_size) != table.image_size:
            raise UserError(f"--checkpoint {f} was trained at {meta['image_size']} px but data.image_size={table.image_size}: "
                            f"set data.image_size={meta['image_size']}")
    if cfg.data.get("split_column"):
        idx = table.indices("test")
        scope = f"rows whose {cfg.data.split_column} is test"
    else:
        idx = table.indices()
        scope = "every labelled image"
    ds = XrayDataset(table, idx, classes)
    labels = ds.label_matrix()
    if len(ds) == 0 or not np.isfinite(labels).any():
        raise UserError(f"data={table.source} has no labelled image to score ({scope})")
    device = pick_device(str(cfg.classify.device))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    tables = []
    for key, files in groups.items():
        per_model = []
        for f in files:
            model, meta = loaded[f]
            thr = (meta.get("extra") or {}).get("thresholds")
            pred = predict(model, ds, device=device, return_features=False)
            m = evaluate(pred.probs, pred.labels, classes, thr if thr is not None else 0.5)
            per_model.append({"checkpoint": str(f), "seed": (meta.get("extra") or {}).get("seed"),
                              "steps": (meta.get("extra") or {}).get("steps"),
                              "thresholds_from": "validation" if thr is not None else "0.5 (not stored in this checkpoint)",
                              "test": m})
        stats = {"auc": {c: _stat([p["test"]["auc"][c] for p in per_model]) for c in classes},
                 "accuracy": {c: _stat([p["test"]["per_class"][c]["accuracy"] for p in per_model]) for c in classes},
                 "f1": {c: _stat([p["test"]["per_class"][c]["f1"] for p in per_model]) for c in classes},
                 "mean_auc": _stat([p["test"]["mean_auc"] for p in per_model])}
        results[key] = {"models": per_model, "summary": stats}
        rows = [[c, _fmt(stats["auc"][c]), _fmt(stats["accuracy"][c]), _fmt(stats["f1"][c]),
                 per_model[0]["test"]["per_class"][c]["n_pos"], per_model[0]["test"]["per_class"][c]["n_neg"]]
                for c in classes]
        rows.append(["mean AUC", _fmt(stats["mean_auc"]), "", "", "", ""])
        title = "" if key == "model" else f"{key}: "
        tables.append(f"{title}{len(files)} model(s)\n\n" + markdown_table(
            rows, ["class", "AUC mean ± sd", "accuracy", "F1", "positives", "negatives"]))
    comparison = None
    arms = [a for a in armlib.ARMS if a in results]
    if len(arms) >= 2 and len(arms) == len(results):  # an arms run: the fair comparison again, on this data
        units = [{"arm": a, "seed": int(p["seed"] if p["seed"] is not None else i), "test": p["test"],
                  "steps": int(p["steps"] or 0)}
                 for a in arms for i, p in enumerate(results[a]["models"])]
        comparison = armlib.compare(units, arms, classes)
        tables.append("The arms on this data, paired by seed (95 % t-interval over seeds; * = excludes 0):\n\n"
                      + armlib.table(comparison, arms, classes))
    text = (f"scored {len(ds)} images of data={table.source} ({scope}) at the validation thresholds\n\n"
            + "\n\n".join(tables))
    print(text)
    (out / "scores.md").write_text(text + "\n")
    return {"mode": "score", "checkpoint": str(src.resolve()), "classes": classes, "data": table.source,
            "data_fingerprint": table.fingerprint, "scope": scope, "n": len(ds), "groups": results,
            "summary": results[next(iter(results))]["summary"], "comparison": comparison,
            "seconds": time.perf_counter() - t0, "versions": versions()}


def _stat(values: list[float | None]) -> dict:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return {"mean": float(np.mean(v)) if v else None, "std": float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None),
            "values": values, "n": len(v)}


def _num(x: float | None) -> str:
    return "undefined" if x is None else f"{x:.3f}"


def _fmt(s: dict) -> str:
    if s["mean"] is None:
        return "undefined"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"
