"""The outputs of a search: ``metrics.json`` content, PNG plots, ``trials.csv`` and the printed summary."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
from optuna.trial import TrialState
from optuna.visualization import matplotlib as ovm

from augment.common import markdown_table, versions
from augment.search.spaces import Space
from augment.search.study import BEST_FILE, best_trial, redact, write_best

log = logging.getLogger(__name__)


def _trial_record(t: optuna.trial.FrozenTrial, space: Space) -> dict:
    values = dict(zip(space.metrics, t.values)) if t.values else None
    attrs = {k: v for k, v in t.user_attrs.items() if k not in ("overrides",)}
    return {"trial": t.number, "state": t.state.name, "values": values, "params": dict(t.params),
            "overrides": list(t.user_attrs.get("overrides") or []), "attrs": attrs,
            "start": t.datetime_start.isoformat() if t.datetime_start else None,
            "complete": t.datetime_complete.isoformat() if t.datetime_complete else None}


def plot_all(study: optuna.Study, space: Space, out: Path) -> dict[str, str]:
    """History, parameter importances and (several objectives) the Pareto front as PNGs; a note
    instead of a file where a plot cannot be made yet."""
    matplotlib.use("Agg")  # files only, never a window (set at the first plot, not at import)
    plots: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def save(key: str, filename: str, draw: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            fig.savefig(out / filename, dpi=110)
            plt.close(fig)
            plots[key] = filename
        except Exception as exc:  # noqa: BLE001 - a plot must never lose the search's results
            plt.close("all")
            plots[key] = f"skipped: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"

    if not complete:
        return {"history": "skipped: no complete trial yet", "importances": "skipped: no complete trial yet"}
    for i, metric in enumerate(space.metrics):
        suffix = f"_{metric}" if space.multi else ""
        target = (lambda t, i=i: t.values[i]) if space.multi else None
        save(f"history{suffix}", f"history{suffix}.png",
             lambda target=target, metric=metric: ovm.plot_optimization_history(study, target=target, target_name=metric))
        if len(complete) < 2:
            plots[f"importances{suffix}"] = f"skipped: {len(complete)} complete trial(s), importances need at least 2"
        else:
            save(f"importances{suffix}", f"importances{suffix}.png",
                 lambda target=target, metric=metric: ovm.plot_param_importances(study, target=target, target_name=metric))
    if space.multi:
        save("pareto", "pareto.png", lambda: ovm.plot_pareto_front(study, target_names=list(space.metrics)))
    return plots


def summarize(study: optuna.Study, space: Space, out: Path, url: str, ctx: dict, run: dict) -> dict:
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    this_run = [t for t in trials if t.user_attrs.get("session") == run["session"]]
    best = best_trial(study, space)
    metrics: dict[str, Any] = {
        "space": space.name, "study": study.study_name, "storage": redact(url), "objectives": dict(zip(space.metrics, space.directions)),
        "n_trials": {s.name: states.get(s.name, 0) for s in TrialState}, "total_trials": len(trials),
        "this_run": {"trials": len(this_run), "states": dict(Counter(t.state.name for t in this_run)),
                     "seconds": run["seconds"], "workers": run["workers"], "runtime": run["runtime"],
                     "interrupted": run["interrupted"], "stored_before": run["stored_before"],
                     "worker_pids": sorted({t.user_attrs.get("worker_pid") for t in this_run if t.user_attrs.get("worker_pid")})},
        "classes": ctx["classes"], "best": None,
    }
    if best is not None:
        overrides = write_best(out / BEST_FILE, best, space, study.study_name, url, ctx)
        metrics["best"] = {**_trial_record(best, space), "overrides": overrides, "file": str(out / BEST_FILE)}
    if space.multi:
        metrics["pareto_front"] = [_trial_record(t, space) for t in (study.best_trials if best is not None else [])]
    enqueued = [t for t in trials if t.user_attrs.get("enqueued") and t.state == TrialState.COMPLETE]
    if enqueued:
        metrics["default_trial"] = _trial_record(enqueued[0], space)
    if "baseline" in ctx:
        metrics["baseline"] = {k: v for k, v in ctx["baseline"].items() if k != "checkpoint"}
    for key in ("data_fingerprint", "pool", "pool_sha256", "pool_threshold", "models", "extractor", "extractor_sha256",
                "fid_images", "family"):
        if key in ctx:
            metrics.setdefault("context", {})[key] = ctx[key]
    metrics["failures"] = [{"trial": t.number, "error": t.user_attrs.get("error", "no error recorded")}
                           for t in trials if t.state == TrialState.FAIL]
    metrics["plots"] = plot_all(study, space, out)
    try:
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        metrics["trials_csv"] = "trials.csv"
    except Exception as exc:  # noqa: BLE001 - an empty study has no frame
        log.debug("trials.csv: %s", exc)
    metrics["versions"] = versions()
    _print_summary(metrics, space, trials, best)
    return metrics


def _print_summary(metrics: dict, space: Space, trials: list, best: Any) -> None:
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    sign = 1 if space.directions[0] == "maximize" else -1
    top = sorted(done, key=lambda t: -sign * t.values[0])[:5]
    if top:
        names = list(top[0].params)
        rows = [[t.number, *[f"{v:.4f}" for v in t.values], *[f"{t.params.get(n, float('nan')):.4g}" for n in names]] for t in top]
        print(markdown_table(rows, ["trial", *space.metrics, *names]))
    counts = ", ".join(f"{k.lower()} {v}" for k, v in metrics["n_trials"].items() if v)
    print(f"search: {metrics['total_trials']} trial(s) in the study ({counts}); this run {metrics['this_run']['trials']}")
    if best is None:
        first = metrics["failures"][0]["error"] if metrics["failures"] else "none finished"
        print(f"search: no trial completed yet (first failure: {first}); no best.yaml written")
    else:
        print(f"search: best trial {best.number}: " + ", ".join(f"{m}={v:.4f}" for m, v in zip(space.metrics, best.values))
              + f" -> {metrics['best']['file']}")
    if "baseline" in metrics and metrics["baseline"].get("val_mean_auc") is not None:
        print(f"search: real-only baseline val mean AUC {metrics['baseline']['val_mean_auc']:.4f}")
