"""`augment run experiment=<name>`: the whole flow and the report.

Not a stage: it calls the stages (train, classify, generate, evaluate) in order, so it lives above them.

train (samplers, translator and the pseudo-labelling classifier in parallel Ray actors) ->
baseline (real-only classifiers over seeds) -> generate (pseudo-labeled images with masks) ->
augmented (the fair comparison, ``run.arms``: real, classic augmentation, oversampled real positives,
synthetic and synthetic + classic, every arm at the same step budget over the same seeds, with the
low-data curve when ``run.curve`` names points; ``run.arms=[]`` gives the old real + synthetic run) -> evaluate (FID/KID/IS/PR, class
fidelity, mask metrics) -> report (report.md, report.html).

Each step writes into ``<out>/<step>/`` and a ``done.json`` with the hash of the configuration it
depends on; a rerun skips a step whose hash matches (resumable), reruns it and everything after it
when it changed, and ``--from STEP`` reruns from a step. The default output folder is
``runs/run/<experiment>`` so that running the same command again resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from augment.common import resolve_classes, write_json
from augment.config import save_config, to_dict
from augment.errors import UserError
from augment.report import build_report
from augment.stages import classify as classify_stage
from augment.stages import evaluate as evaluate_stage
from augment.stages import generate as generate_stage
from augment.stages import train as train_stage

log = logging.getLogger(__name__)

STEPS = ("train", "baseline", "generate", "augmented", "evaluate", "report")
# The configuration sections each step depends on (its hash covers these and every earlier step's).
DEPENDS = {
    "train": ("data", "classes", "seed", "generator", "translator", "classifier", "train", "run"),
    "baseline": ("classify", "run_baseline"),
    "generate": ("generate", "mask"),
    "augmented": ("run_arms",),
    "evaluate": ("evaluate",),
    "report": (),
}
FOLDER = {"generate": "synthetic"}


def step_hashes(cfg: DictConfig) -> dict[str, str]:
    plain = to_dict(cfg)
    run = plain.get("run") or {}
    plain["run"] = {k: v for k, v in run.items() if k not in ("from_step", "arms", "curve", "baseline")}  # how, not what
    plain["run_arms"] = {k: run.get(k) for k in ("arms", "curve")}  # only the comparison depends on these
    plain["run_baseline"] = run.get("baseline")
    hashes, acc = {}, hashlib.sha256()
    for step in STEPS:
        for key in DEPENDS[step]:
            acc.update(json.dumps([key, plain.get(key)], sort_keys=True, default=str).encode())
        hashes[step] = acc.copy().hexdigest()[:16]
    return hashes


def _with(cfg: DictConfig, **values: Any) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set."""
    new = OmegaConf.create(to_dict(cfg))
    with open_dict(new):
        for key, value in values.items():
            OmegaConf.update(new, key, value, force_add=True)
    return new


def run(cfg: DictConfig, out: Path, overrides: list[str] | None = None) -> dict:
    """``augment run``: every stage in order, each skipped when its inputs did not change."""
    rcfg = cfg.run
    start = str(rcfg.from_step or "")
    if start and start not in STEPS:
        raise UserError(f"--from {start}: choose one of {', '.join(STEPS)}")
    resolve_classes(cfg.classes)
    if not rcfg.baseline and not rcfg.arms:
        raise UserError("run.baseline=false needs the arms (their real arm is the baseline): drop run.baseline=false "
                        "or set run.arms=[real,synthetic,...]")
    hashes = step_hashes(cfg)
    base_overrides = [o for o in (overrides or []) if not o.startswith(("generator=", "translator=", "out="))]
    timings: dict[str, float] = {}
    results: dict[str, Any] = {}
    rerun = False
    models = out / "train"
    for step in STEPS:
        folder = out / FOLDER.get(step, step)
        marker = folder / "done.json" if step != "generate" else out / "generate.done.json"
        if step == start:
            rerun = True
        done = json.loads(marker.read_text()) if marker.is_file() else None
        if done and done.get("hash") == hashes[step] and not rerun:
            print(f"[{step}] up to date, skipped ({marker})")
            results[step] = done.get("summary")
            timings[f"{step} (earlier run)"] = float(done.get("seconds", 0.0))
            continue
        rerun = True  # everything after a rerun step is rerun too
        if folder.exists() and step != "report":
            shutil.rmtree(folder)
        marker.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"[{step}] running")
        t0 = time.perf_counter()
        if step == "train":
            fams = [f"generator={','.join(rcfg.generators)}"] + ([f"translator={rcfg.translator}"] if rcfg.translator else [])
            step_cfg = cfg
            metrics = train_stage.train(cfg, folder, overrides=[*base_overrides, *fams])
            summary = {f: {"steps_per_second": m.get("steps_per_second"), "seconds": m.get("seconds")}
                       for f, m in metrics["models"].items()}
        elif step == "baseline" and not rcfg.baseline:
            step_cfg = cfg
            metrics = {"skipped": "run.baseline=false: the arms' real arm is the real-only comparison"}
            summary = metrics
            print(f"[{step}] skipped: run.baseline=false")
        elif step == "baseline" or (step == "augmented" and not rcfg.arms):
            syn = [str((out / "synthetic").resolve())] if step == "augmented" else []
            step_cfg = _with(cfg, **{"classify.synthetic": syn})
            metrics = classify_stage.classify(step_cfg, folder)
            summary = {"mean_auc": metrics["summary"]["mean_auc"], "auc": {c: v["mean"] for c, v in metrics["summary"]["auc"].items()}}
        elif step == "augmented":  # the fair comparison: every arm at the same step budget (run.arms, run.curve)
            step_cfg = _with(cfg, **{"classify.synthetic": [str((out / "synthetic").resolve())],
                                     "classify.arms": list(rcfg.arms), "classify.curve": list(rcfg.curve or [])})
            metrics = classify_stage.classify(step_cfg, folder)
            comparison = metrics.get("comparison") or metrics["curve"][metrics["points"][-1]]
            summary = {"mode": "arms", "mean_auc": {a: v["auc"]["mean_auc"]["mean"] for a, v in comparison["arms"].items()},
                       "best_control": comparison.get("best_control")}
        elif step == "generate":
            step_cfg = _with(cfg, **{"generate.models": str(models.resolve()), "generate.overwrite": True,
                                     "generate.sampler": str(rcfg.generators[0]),
                                     "generate.translator": str(rcfg.translator) if rcfg.translator else None})
            metrics = generate_stage.generate(step_cfg, folder)
            summary = {"counts": metrics["counts"], "images_per_second": metrics["images_per_second"]}
        elif step == "evaluate":
            # Domain features and class fidelity from a baseline classifier: trained on the real data only and
            # independent of the pseudo-labeller that selected the synthetic images.
            feature = (sorted((out / "baseline").glob("seed*/best.pt"))
                       or sorted((out / "augmented" / "real").glob("seed*/best.pt")))  # run.baseline=false
            step_cfg = _with(cfg, **{"evaluate.models": str(models.resolve()), "evaluate.synthetic": str((out / "synthetic").resolve()),
                                     **({"evaluate.feature_checkpoint": str(feature[0].resolve())} if feature else {})})
            metrics = evaluate_stage.evaluate(step_cfg, folder)
            summary = {"image_quality": (metrics.get("image_quality") or {}).get("overall")}
        else:
            step_cfg = cfg
            paths = build_report(out, to_dict(cfg), {k: v for k, v in timings.items()})
            metrics = {k: str(v) for k, v in paths.items()}
            summary = metrics
        seconds = time.perf_counter() - t0
        timings[step] = seconds
        if step != "generate":
            write_json(folder / "metrics.json", metrics)
            save_config(step_cfg, folder / "config.yaml")
        write_json(marker, {"hash": hashes[step], "seconds": seconds, "summary": summary})
        results[step] = summary
        print(f"[{step}] done in {seconds:.1f} s")
    print(f"report: {out / 'report.html'}")
    return {"steps": results, "timings": timings, "report": str(out / "report.html"), "hashes": hashes}


def default_out(cfg: DictConfig) -> str:
    return str(Path("runs") / "run" / str(cfg.get("choices", {}).get("experiment") or "default"))


__all__ = ["run", "STEPS", "default_out"]
