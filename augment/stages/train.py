"""`augment train`: samplers (cgan, ucgan) and translators (fixed_point, taggan, branched), each in
its own Ray actor (one GPU each where there is one), resumable from checkpoints.

``augment train generator=cgan,ucgan translator=taggan`` trains three models at once. Models land
in ``<out>/models/<family>/checkpoint.pt`` and ``runs/train/latest`` points at the newest run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from augment import runtime
from augment.config import build, compose, group_options, to_dict
from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.sources import load_table
from augment.data.table import DataTable, XrayDataset
from augment.errors import UserError
from augment.progress import StepWatcher
from augment.stages.common import markdown_table, resolve_classes, versions

log = logging.getLogger(__name__)

KINDS = ("generator", "translator")
LATEST = Path("runs") / "train" / "latest"


def model_classes(kind: str, cfg: dict, classes: list[str]) -> list[str]:
    """The class list a model is built with: UCGAN's classifier also has a ``No Finding`` class."""
    if kind == "generator" and str(cfg.get("_target_", "")).endswith("UCGAN"):
        return [*classes, NO_FINDING]
    return list(classes)


def model_config(kind: str, family_cfg: dict, classes: list[str]) -> dict:
    """Resolved model config with the call-site arguments filled in (what the checkpoint stores)."""
    mcfg = dict(family_cfg)
    mclasses = model_classes(kind, mcfg, classes)
    mcfg["classes"] = mclasses
    if isinstance(mcfg.get("classifier"), dict):
        mcfg["classifier"] = {**mcfg["classifier"], "num_classes": len(mclasses)}
    return mcfg


def training_rows(table: DataTable, classes: list[str], split: str = "train") -> np.ndarray:
    """Rows that are healthy or have one of ``classes`` and no other finding (so that all-zero
    labels over ``classes`` really mean healthy)."""
    idx = table.indices(split)
    labels = table.labels[idx]
    sel = [VOCABULARY.index(c) for c in classes]
    other = [i for i, c in enumerate(VOCABULARY) if c not in classes and c != NO_FINDING]
    with np.errstate(invalid="ignore"):
        has_sel = np.nan_to_num(labels[:, sel]).sum(1) > 0
        healthy = labels[:, VOCABULARY.index(NO_FINDING)] == 1
        clean = np.nan_to_num(labels[:, other]).sum(1) == 0
    return idx[(has_sel | healthy) & clean]


def train_one(payload: dict) -> dict:
    """Train one family (a Ray work unit: plain dict in, plain dict out). Resumes when its
    checkpoint exists, so a restarted actor continues where it stopped."""
    import torch

    from generators.train import fit

    cfg, kind, family = payload["cfg"], payload["kind"], payload["family"]
    if kind == "classifier":
        return _train_labeller(payload)
    tcfg = cfg["train"]
    classes = payload["classes"]
    out = Path(payload["out"])
    table = load_table(cfg["data"], show_progress=False)
    mcfg = model_config(kind, cfg[kind], classes)
    from augment.stages.classify import limited_train_indices

    rows = np.intersect1d(training_rows(table, classes), limited_train_indices(table, cfg))  # same real data as the classifiers
    ds = XrayDataset(table, rows, mcfg["classes"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))  # weight init is drawn here; the caller's RNG state is restored
        system = build(mcfg)
    start = _checkpoint_step(out / "checkpoint.pt") if bool(tcfg["resume"]) else 0
    t0 = time.perf_counter()
    try:
        metrics = fit(
            system, ds, batch_size=int(tcfg.get(f"{kind}_batch_size") or tcfg["batch_size"]), max_steps=int(tcfg["max_steps"]), device=str(tcfg["device"]),
            seed=int(cfg["seed"]), ckpt_dir=out, ckpt_every=int(tcfg["ckpt_every"]), resume=bool(tcfg["resume"]),
            ema_decay=tcfg.get("ema_decay"), amp=bool(tcfg["amp"]), balanced=bool(tcfg["balanced"]),
            num_workers=int(tcfg["num_workers"]), sample_every=tcfg.get("sample_every"),
            ckpt_meta={"model_cfg": mcfg, "classes": mcfg["classes"], "image_size": table.image_size,
                       "data_fingerprint": table.fingerprint, "kind": kind, "family": family},
            progress=bool(cfg.get("progress", True)),
        )
    except ValueError as exc:
        if "checkpoint" in str(exc):
            raise UserError(f"{family}: {exc}; train into a new --out folder") from None
        raise
    seconds = time.perf_counter() - t0
    done = int(tcfg["max_steps"]) - start
    return {"kind": kind, "family": family, "checkpoint": str(out / "checkpoint.pt"), "metrics": metrics,
            "seconds": seconds, "steps": int(tcfg["max_steps"]), "resumed_from": start, "images": len(ds),
            "steps_per_second": done / seconds if seconds > 0 and done > 0 else None}


def _train_labeller(payload: dict) -> dict:
    """The pseudo-labeller of the CGAN (and the domain-FID feature extractor): a classifier on the
    real data, trained like `augment classify` (one seed)."""
    from augment.stages.classify import train_one as classify_one

    cfg = payload["cfg"]
    balanced = cfg["train"].get("labeller_balanced", True)
    cfg = {**cfg, "classify": {**cfg["classify"], "balanced": bool(balanced)}}
    t0 = time.perf_counter()
    info = classify_one({"cfg": cfg, "seed": int(cfg["seed"]), "out": payload["out"], "classes": payload["classes"],
                         "synthetic": []})
    seconds = time.perf_counter() - t0
    return {"kind": "classifier", "family": "classifier", "checkpoint": info["checkpoint"],
            "metrics": {"test_mean_auc": info["test"]["mean_auc"], "best_val_auc": info.get("best_val_auc")},
            "seconds": seconds, "steps": info.get("best_epoch"), "resumed_from": 0, "images": info["n_train_real"],
            "steps_per_second": None}


def _checkpoint_step(path: Path) -> int:
    from generators.checkpoint import load_checkpoint

    try:
        return int(load_checkpoint(path)["step"]) if path.is_file() else 0
    except (ValueError, KeyError):
        return 0


def split_family_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Take ``generator=a,b`` / ``translator=c`` out of the overrides as (kind, family) jobs."""
    rest, jobs = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if key in KINDS and value:
            for fam in [v.strip() for v in value.split(",") if v.strip()]:
                if fam not in group_options(key):
                    raise UserError(f"unknown {key} family '{fam}': choose from {', '.join(group_options(key))}")
                jobs.append((key, fam))
        else:
            rest.append(o)
    return rest, jobs


def check_counts(table: DataTable, classes: list[str], minimum: int) -> None:
    rows = table.indices("train")
    for c in classes:
        n = int(np.nansum(table.column(c)[rows] == 1))
        if n < minimum:
            raise UserError(f"only {n} training image(s) of {c} in data={table.source} (minimum {minimum}): "
                            "add data, drop the class, or lower train.min_images_per_class")


def train(cfg: DictConfig, out: Path, overrides: list[str] | None = None) -> dict:
    """The ``augment train`` stage."""
    base_overrides, jobs = split_family_overrides(list(overrides or []))
    if not jobs:
        jobs = [(k, str(cfg.choices[k])) for k in cfg.train.default]
    if cfg.train.labeller and any(k == "generator" and f == "cgan" for k, f in jobs) and not any(k == "classifier" for k, _ in jobs):
        jobs.append(("classifier", str(cfg.choices.classifier)))  # the CGAN's pseudo-labeller
    resolve_classes(cfg.classes)
    table = load_table(cfg.data, show_progress=cfg.progress)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    check_counts(table, classes, int(cfg.train.min_images_per_class))
    payloads = []
    for kind, fam in jobs:
        fcfg = compose([*base_overrides, f"{kind}={fam}"])
        folder = "classifier" if kind == "classifier" else fam
        payloads.append({"cfg": to_dict(fcfg), "kind": kind, "family": fam, "classes": classes,
                         "out": str((out / "models" / folder).resolve())})
    print(f"train: {', '.join(f for _, f in jobs)} on data={table.source} {table.image_size} px, "
          f"classes {', '.join(classes)}, {int(cfg.train.max_steps)} steps each"
          + ("" if runtime.is_inline(cfg.runtime) else f" (Ray actors, {runtime.gpus_per_worker(cfg.runtime):g} GPU each)"))
    t0 = time.perf_counter()
    watcher = StepWatcher({p["family"] if p["kind"] != "classifier" else "classifier":
                           ((Path(p["out"]) / "metrics.jsonl") if p["kind"] != "classifier" else None, int(cfg.train.max_steps))
                           for p in payloads}, desc="train", enabled=bool(cfg.progress))
    try:
        results = runtime.run_all("augment.stages.train:train_one", payloads, cfg.runtime, poll=watcher)
    finally:
        watcher.close()
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(str(out.resolve()) + "\n")
    rows = [[r["family"], r["kind"], r["steps"], f"{r['seconds']:.1f}", (f"{r['steps_per_second']:.2f}" if r["steps_per_second"] else "-"), r["checkpoint"]]
            for r in results]
    print(markdown_table(rows, ["family", "kind", "steps", "seconds", "steps/s", "checkpoint"]))
    return {"classes": classes, "image_size": table.image_size, "data": table.source,
            "data_fingerprint": table.fingerprint, "models": {(r["kind"] if r["kind"] == "classifier" else r["family"]): r for r in results},
            "seconds": time.perf_counter() - t0, "versions": versions()}


def find_models(models: str | None) -> Path:
    """The train run to use: ``--models DIR`` or ``runs/train/latest``."""
    if models:
        path = Path(models).expanduser()
        if (path / "models").is_dir():
            return path.resolve()
        if path.name == "models" and path.is_dir():
            return path.parent.resolve()
        raise UserError(f"--models {models} holds no trained models (expected {path}/models/<family>/checkpoint.pt): "
                        "run `augment train` first")
    if not LATEST.is_file():
        raise UserError("no trained models found: run `augment train generator=cgan translator=fixed_point` first "
                        "(or pass --models DIR)")
    return Path(LATEST.read_text().strip())


def load_model(path: Path) -> tuple[Any, dict]:
    """Rebuild a model from its checkpoint's own config (weights_only) with EMA weights."""
    from generators.checkpoint import apply_checkpoint, load_checkpoint

    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load {path}: {exc}") from None
    system = build(ckpt["model_cfg"])
    apply_checkpoint(system, ckpt, ema=True)
    system.eval()
    return system, ckpt


__all__ = ["train", "train_one", "find_models", "load_model", "to_dict"]
