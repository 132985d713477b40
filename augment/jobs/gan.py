"""The GAN work unit: train one family (sampler or translator) or the CGAN's pseudo-labeller.

A Ray work unit of ``augment train`` (plain dict in, plain dict out); it resumes from its checkpoint,
so a restarted actor continues where it stopped. Also :func:`training_rows`, the real rows every
model of a run trains on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from augment.config import build
from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.sources import load_table
from augment.data.table import DataTable, XrayDataset
from augment.errors import UserError
from augment.jobs.classifier import limited_train_indices, train_seed
from augment.models import checkpoint_step, model_config
from generators.train import CheckpointConfig, HookBase, LogConfig, LoopConfig, fit

log = logging.getLogger(__name__)


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


def train_model(payload: dict, hooks: Sequence[HookBase] = ()) -> dict:
    """Train one family (``payload``: resolved ``cfg``, ``kind``, ``family``, ``classes``, ``out``);
    ``hooks`` (in-process callers only, e.g. benchmarks/quality_fewshot.py) go to ``fit``."""
    cfg, kind, family = payload["cfg"], payload["kind"], payload["family"]
    if kind == "classifier":
        return train_labeller(payload)
    tcfg = cfg["train"]
    classes = payload["classes"]
    out = Path(payload["out"])
    table = load_table(cfg["data"], show_progress=False)
    mcfg = model_config(cfg[kind], classes)
    rows = np.intersect1d(training_rows(table, classes), limited_train_indices(table, cfg))  # same real data as the classifiers
    ds = XrayDataset(table, rows, mcfg["classes"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))  # weight init is drawn here; the caller's RNG state is restored
        system = build(mcfg)
    start = checkpoint_step(out / "checkpoint.pt") if bool(tcfg["resume"]) else 0
    t0 = time.perf_counter()
    try:
        metrics = fit(
            system, ds,
            LoopConfig(batch_size=int(tcfg[f"{kind}_batch_size"] or tcfg["batch_size"]), max_steps=int(tcfg["max_steps"]),
                       seed=int(cfg["seed"]), device=str(tcfg["device"]), amp=bool(tcfg["amp"]),
                       balanced=bool(tcfg["balanced"]), num_workers=int(tcfg["num_workers"]), ema_decay=tcfg["ema_decay"]),
            checkpoint=CheckpointConfig(out, every=int(tcfg["ckpt_every"]), resume=bool(tcfg["resume"]),
                                        meta={"model_cfg": mcfg, "classes": mcfg["classes"], "image_size": table.image_size,
                                              "data_fingerprint": table.fingerprint, "kind": kind, "family": family}),
            logs=LogConfig(sample_every=tcfg["sample_every"], progress=bool(cfg["progress"])),
            hooks=hooks,
        )
    except ValueError as exc:
        if "checkpoint" in str(exc):
            raise UserError(f"{family}: {exc}; train into a new --out folder", resumable=False) from None
        raise
    seconds = time.perf_counter() - t0
    done = int(tcfg["max_steps"]) - start
    return {"kind": kind, "family": family, "checkpoint": str(out / "checkpoint.pt"), "metrics": metrics,
            "seconds": seconds, "steps": int(tcfg["max_steps"]), "resumed_from": start, "images": len(ds),
            "steps_per_second": done / seconds if seconds > 0 and done > 0 else None}


def train_labeller(payload: dict) -> dict:
    """The pseudo-labeller of the CGAN (and the domain-FID feature extractor): a classifier on the
    real data, trained like `augment classify` (one seed)."""
    cfg = payload["cfg"]
    balanced = cfg["train"]["labeller_balanced"]
    cfg = {**cfg, "classify": {**cfg["classify"], "balanced": bool(balanced)}}
    t0 = time.perf_counter()
    info = train_seed({"cfg": cfg, "seed": int(cfg["seed"]), "out": payload["out"], "classes": payload["classes"],
                       "synthetic": []})
    seconds = time.perf_counter() - t0
    return {"kind": "classifier", "family": "classifier", "checkpoint": info["checkpoint"],
            "metrics": {"test_mean_auc": info["test"]["mean_auc"], "best_val_auc": info.get("best_val_auc")},
            "seconds": seconds, "steps": info.get("best_epoch"), "resumed_from": 0, "images": info["n_train_real"],
            "steps_per_second": None}
