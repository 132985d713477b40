"""`augment search`: Optuna searches over pseudo-labelling, UCGAN and translator settings.

The only package that touches ``optuna.Trial``, split by responsibility:

* :mod:`~augment.search.spaces`: the spaces (:data:`~augment.search.spaces.SPACES`): what each suggests,
  starts from, prepares once and scores per trial;
* :mod:`~augment.search.study`: storage, sampler, pruner, opening or resuming the study, its best trial
  and ``best.yaml`` (:func:`read_best` for ``--from-search``);
* :mod:`~augment.search.worker`: the trial loop, run in this process or as Ray actors;
* :mod:`~augment.search.outputs`: ``metrics.json`` content, plots, ``trials.csv``, the printed summary;
* here: :func:`search`, the ``augment search`` stage that ties them together.

Storage is a SQLite file in the run folder unless ``--storage URL`` names another database
(PostgreSQL for many machines); the same command with the same ``--out`` continues the study.
``--workers N`` runs N trial loops at once as Ray actors (one GPU each where there are GPUs), each
calling ``study.optimize`` against the shared storage. A trial that raises or returns NaN is stored as
FAIL and the study goes on; Ctrl-C stops after marking the running trial FAIL, and writes the outputs
of what is stored. The outputs: ``best.yaml`` (the best trial's overrides; apply them with
``augment <command> --from-search best.yaml``), ``metrics.json``, ``trials.csv`` and PNG plots.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from augment import runtime
from augment.common import resolve_classes
from augment.config import compose, to_dict
from augment.data.sources import load_table
from augment.errors import Interrupted, UserError
from augment.search.outputs import summarize
from augment.search.spaces import FAMILY_KEYS, SPACES, check_ranges, merge_overrides, override_key
from augment.search.study import fail_running, fail_stale, in_range, open_study, read_best, redact
from augment.search.worker import TARGET, run_worker, worker_device

__all__ = ["read_best", "search"]

log = logging.getLogger(__name__)


def search(cfg: DictConfig, out: Path, overrides: list[str] | None = None) -> dict:
    """The ``augment search`` stage."""
    scfg = cfg.search
    name = scfg.get("space")
    if not name:
        raise UserError(f"no search space: pass search=<space> (one of {', '.join(SPACES)})")
    if name not in SPACES:
        raise UserError(f"unknown search space '{name}': choose one of {', '.join(SPACES)} (search=<space>)")
    space = SPACES[name]
    n_trials, workers = int(scfg.n_trials), int(scfg.workers)
    if n_trials < 1:
        raise UserError(f"--trials {n_trials}: run at least one trial")
    if workers < 1:
        raise UserError(f"--workers {workers}: use at least one worker")
    timeout = None if scfg.timeout is None else float(scfg.timeout)
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout {scfg.timeout}: give a positive number of seconds")
    if str(scfg.pruner) not in ("median", "hyperband", "none") or str(scfg.sampler) not in ("tpe", "random"):
        raise UserError(f"search.pruner={scfg.pruner} / search.sampler={scfg.sampler}: pruner is median, hyperband "
                        "or none; sampler is tpe or random")
    ranges = check_ranges(space, to_dict(scfg.params))
    resolve_classes(cfg.classes)
    inline = runtime.is_inline(cfg.runtime) or workers == 1
    if workers > 1 and not runtime.is_inline(cfg.runtime):
        res = runtime.resources(cfg.runtime)
        if workers > res["CPU"]:
            raise UserError(f"--workers {workers} is more than the {res['CPU']:g} CPU(s) Ray can use here: pass "
                            f"--workers {max(1, int(res['CPU']))} or fewer, or run on a cluster (runtime=cluster)")
        need = workers * runtime.gpus_per_worker(cfg.runtime)
        if res["GPU"] > 0 and need > res["GPU"]:
            raise UserError(f"--workers {workers} needs {need:g} GPU(s) but {res['GPU']:g} are available: pass "
                            f"--workers {int(res['GPU'] / max(runtime.gpus_per_worker(cfg.runtime), 1e-9))} or fewer, "
                            "or share GPUs with runtime.gpus_per_worker=0.5")
    out = out.resolve()
    url = str(scfg.storage) if scfg.storage else f"sqlite:///{out / 'study.db'}"
    study_name = str(scfg.study or name)
    study = open_study(url, study_name, space)
    before = len(study.get_trials(deepcopy=False))
    stale = fail_stale(url, study_name, scfg.heartbeat)
    if stale:
        print(f"search: {stale} trial(s) of an earlier run were still RUNNING with no heartbeat for "
              f"{2 * float(scfg.heartbeat):g} s (their worker died): marked FAIL")

    base = [o for o in (overrides or []) if not (override_key(o) in FAMILY_KEYS and "," in o)]
    fixed = merge_overrides(list(space.fixed), list(scfg.overrides or []))
    base_cfg = compose(merge_overrides(base, fixed))
    table = load_table(base_cfg.data, show_progress=bool(cfg.progress))
    classes = resolve_classes(base_cfg.classes, table, allow_no_finding=False)
    seeds = list(base_cfg.classify.seeds or [0])
    ctx: dict[str, Any] = {"out": str(out), "classes": classes, "classify_seed": int(seeds[0]),
                           "data_fingerprint": table.fingerprint,
                           "keep_checkpoints": bool(scfg.keep_checkpoints), "device": worker_device(to_dict(base_cfg))}
    print(f"search {name}: study '{study_name}' in {redact(url)} ({before} trial(s) stored), "
          f"{n_trials} more on {workers} worker(s), classes {', '.join(classes)}")
    space.prepare(base_cfg, out, merge_overrides(base, fixed), ctx)
    for key in ("data_fingerprint", "pool_sha256", "extractor_sha256"):
        if key in ctx:
            stored = study.user_attrs.get(key)
            if stored is not None and stored != ctx[key]:
                log.warning("this run's %s differs from the one the study's earlier trials used: trials are "
                            "comparable only on the same data, pool and extractor (pass search.models=<shared run>)", key)
            elif stored is None:
                study.set_user_attr(key, ctx[key])
    if before == 0 and bool(scfg.enqueue_defaults):
        start = in_range(space.defaults(to_dict(base_cfg)), ranges)
        if start:
            study.enqueue_trial(start, user_attrs={"enqueued": "the base config's values"})

    session = uuid.uuid4().hex[:12]
    ranks = 1 if inline else workers
    shares = [n_trials // ranks + (1 if k < n_trials % ranks else 0) for k in range(ranks)]
    context = {k: v for k, v in ctx.items() if k != "device"}  # each worker picks its own device
    payloads = [{"space": name, "search": to_dict(scfg), "context": context, "base": base, "storage": url,
                 "study": study_name, "n_trials": share, "timeout": timeout, "rank": k, "session": session,
                 "sampler_seed": int(scfg.seed) + k + 7919 * before}  # a rerun does not repeat the startup points
                for k, share in enumerate(shares) if share > 0]
    if inline and workers > 1:
        print(f"search: runtime={cfg.runtime.name}: the {workers} workers run as one loop in this process")
    t0 = time.perf_counter()
    interrupted = False
    try:
        if inline:
            results = [run_worker(p) for p in payloads]
        else:
            results = runtime.run_all(TARGET, payloads, cfg.runtime)
    except KeyboardInterrupt:
        interrupted = True
        results = []
        fail_running(study, session)
    seconds = time.perf_counter() - t0
    metrics = summarize(study, space, out, url, ctx, {
        "seconds": seconds, "interrupted": interrupted, "workers": workers, "requested_trials": n_trials,
        "stored_before": before, "worker_results": results, "session": session, "runtime": str(cfg.runtime.name)})
    if interrupted:  # the summary is written; the command still fails (exit 130), as an interrupted one must
        done = sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        raise Interrupted(f"the study keeps its {done} finished trial(s); rerun the same command (--out {out}) "
                          "to continue", metrics)
    return metrics
