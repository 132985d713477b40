"""The worker: one trial loop against the shared study (a Ray work unit, or run in this process).

``--workers N`` runs N of these loops at once as Ray actors (one GPU each where there are GPUs),
each calling ``study.optimize`` against the shared storage. A trial that raises or returns NaN is
stored as FAIL and the study goes on.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from pathlib import Path

import optuna
import torch

from augment.search.spaces import SPACES, compose_cached, drop_checkpoints, merge_overrides
from augment.search.study import make_pruner, make_sampler, make_storage

log = logging.getLogger(__name__)


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C with its traceback ("Trial 3 failed ... KeyboardInterrupt");
    the user pressed the key, so the line stays and the traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_interrupts() -> None:
    """Install :class:`_NoInterruptTraceback` on optuna's trial loop logger (once per process)."""
    logger = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _NoInterruptTraceback) for f in logger.filters):
        logger.addFilter(_NoInterruptTraceback())

#: The work unit :func:`augment.runtime.run_all` resolves in each actor.
TARGET = "augment.search.worker:run_worker"


def run_worker(payload: dict) -> dict:
    """One trial loop (a Ray work unit, or called in this process): ``study.optimize`` on the shared
    study for ``payload["n_trials"]`` trials. Plain dict in, plain dict out."""
    quiet_interrupts()
    space = SPACES[payload["space"]]
    scfg = payload["search"]
    ctx = dict(payload["context"])
    base = list(payload["base"])
    fixed = merge_overrides(list(space.fixed), list(scfg.get("overrides") or []))
    base_cfg = compose_cached(merge_overrides(base, fixed))
    pruner = make_pruner(space, scfg, int(base_cfg["classify"]["epochs"]))
    ctx["prune"] = not isinstance(pruner, optuna.pruners.NopPruner)
    ctx.setdefault("device", worker_device(base_cfg))
    storage = make_storage(payload["storage"], scfg.get("heartbeat"))
    study = optuna.load_study(study_name=payload["study"], storage=storage,
                              sampler=make_sampler(space, scfg, int(payload["sampler_seed"])), pruner=pruner)
    host, pid = socket.gethostname(), os.getpid()
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float | list[float]:
        ran.append(trial.number)
        trial.set_user_attr("worker", f"{host}:{pid}")
        trial.set_user_attr("worker_pid", pid)
        trial.set_user_attr("worker_rank", int(payload["rank"]))
        trial.set_user_attr("session", payload["session"])
        try:
            space_overrides = space.suggest(trial, scfg["params"], base_cfg)
            trial.set_user_attr("overrides", space_overrides)
            result = space.objective(trial, merge_overrides(base, fixed, space_overrides), ctx)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).strip()[:500]}")
            raise
        finally:
            if not ctx.get("keep_checkpoints"):
                drop_checkpoints(Path(ctx["out"]) / "trials" / f"{trial.number:04d}")
        for key, value in (result.get("attrs") or {}).items():
            trial.set_user_attr(key, value)
        values = [float(v) for v in result["values"]]
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("error", f"objective value not finite: {values}")
        return values if space.multi else values[0]

    remaining = int(payload["n_trials"])
    while remaining > 0:
        before = len(ran)
        try:
            study.optimize(objective, n_trials=remaining, timeout=payload.get("timeout"),
                           catch=(Exception,), gc_after_trial=True)
            break
        except ValueError as exc:
            # optuna#4002: two processes can pop the same enqueued (WAITING) trial; the one that finishes
            # second cannot tell it. The other worker stored it, so drop the duplicate and go on.
            if not str(exc).startswith("Cannot tell a"):
                raise
            duplicate = ran.pop()
            log.warning("trial %d was also run by another worker (optuna#4002); continuing", duplicate)
            remaining -= len(ran) - before
    return {"rank": payload["rank"], "pid": pid, "host": host, "trials": ran}


def worker_device(cfg: dict) -> str:
    """The device this process trains and extracts on: ``classify.device`` (``auto``: cuda when present)."""
    want = str(cfg["classify"]["device"])
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want
