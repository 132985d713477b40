"""`augment train`: samplers (cgan, ucgan) and translators (fixed_point, taggan, branched), each in
its own Ray actor (one GPU each where there is one), resumable from checkpoints.

``augment train generator=cgan,ucgan translator=taggan`` trains three models at once. Models land
in ``<out>/models/<family>/checkpoint.pt`` and ``runs/train/latest`` points at the newest run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from augment import runtime
from augment.common import markdown_table, resolve_classes, versions
from augment.config import compose, group_options, to_dict
from augment.data.sources import load_table
from augment.data.table import DataTable
from augment.errors import UserError
from augment.models import mark_latest
from augment.progress import StepWatcher

log = logging.getLogger(__name__)

KINDS = ("generator", "translator")


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
        results = runtime.run_all("augment.jobs.gan:train_model", payloads, cfg.runtime, poll=watcher)
    finally:
        watcher.close()
    mark_latest(out)
    rows = [[r["family"], r["kind"], r["steps"], f"{r['seconds']:.1f}", (f"{r['steps_per_second']:.2f}" if r["steps_per_second"] else "-"), r["checkpoint"]]
            for r in results]
    print(markdown_table(rows, ["family", "kind", "steps", "seconds", "steps/s", "checkpoint"]))
    return {"classes": classes, "image_size": table.image_size, "data": table.source,
            "data_fingerprint": table.fingerprint, "models": {(r["kind"] if r["kind"] == "classifier" else r["family"]): r for r in results},
            "seconds": time.perf_counter() - t0, "versions": versions()}


__all__ = ["train"]
