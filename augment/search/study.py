"""The study: its storage, sampler and pruner, opening or resuming it, and its best trial.

Storage is a SQLite file in the run folder unless ``--storage URL`` names another database
(PostgreSQL for many machines); the same command with the same ``--out`` continues the study.
``best.yaml`` holds the best trial's overrides; ``augment <command> --from-search best.yaml`` applies
them (:func:`read_best`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from filelock import FileLock
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from augment.errors import UserError
from augment.search.spaces import Space, quote
from augment.search.urls import storage_url

log = logging.getLogger(__name__)

BEST_FILE = "best.yaml"


def redact(url: str) -> str:
    """The storage URL without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given (it has no password to hide)
        return url


class SQLiteStorage(optuna.storages.RDBStorage):
    """RDB storage on one SQLite file shared by several processes on this machine.

    Optuna claims an enqueued trial by reading its state and writing RUNNING in one transaction
    with ``SELECT ... FOR UPDATE``, which SQLite ignores: two workers asking at once both claim it,
    both run it, and the study ends a trial short (optuna#4002; seen in CI). A file lock beside the
    database makes every state change one at a time, so the second worker sees RUNNING and moves on.
    PostgreSQL and MySQL honour FOR UPDATE and need none of this.
    """

    def __init__(self, url: str, lock_path: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._lock_path = lock_path

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        with FileLock(self._lock_path):
            return super().set_trial_state_values(trial_id, state=state, values=values)


def sqlite_path(url: str) -> str | None:
    """The database file of a ``sqlite:///`` URL; None for an in-memory database or another dialect."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL: RDBStorage says so
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def make_storage(url: str, heartbeat: float | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for locks and claims trials under a file lock (several workers
    write to one file, :class:`SQLiteStorage`); a heartbeat lets the next trial mark a dead worker's
    trial FAIL. Bad URLs become one-line UserErrors."""
    url = storage_url(url)  # postgresql:// with whichever PostgreSQL driver is installed
    kwargs: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    storage_class: Any = optuna.storages.RDBStorage
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 120}
        db = sqlite_path(url)
        if db is not None:
            storage_class = SQLiteStorage
            kwargs["lock_path"] = db + ".lock"
    if heartbeat:
        kwargs.update(heartbeat_interval=int(heartbeat), grace_period=int(2 * heartbeat))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return storage_class(url, engine_kwargs=engine or None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open the study storage {redact(url)} ({type(exc).__name__}: {first[:200]}): "
                        "pass a reachable SQLAlchemy URL to --storage (sqlite:///path/study.db, "
                        "postgresql://user:pw@host/db with its driver installed) or leave it out") from None


def make_sampler(space: Space, scfg: dict, seed: int) -> optuna.samplers.BaseSampler:
    if space.multi:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, int(scfg["population_size"])))
    if scfg["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(scfg["startup_trials"]))


def make_pruner(space: Space, scfg: dict, epochs: int) -> optuna.pruners.BasePruner:
    name = str(scfg["pruner"] or "none")
    if space.multi or name == "none":
        return optuna.pruners.NopPruner()
    first = int(scfg["warmup_epochs"]) + 1  # epochs count from 1: the first prunable epoch
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(first, max(1, epochs)), max_resource=max(1, epochs),
                                              reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=int(scfg["startup_trials"]), n_warmup_steps=first)


def open_study(url: str, name: str, space: Space) -> optuna.Study:
    """Create or load the study; refuse one that exists with other directions or another space."""
    storage = make_storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(space.directions),
                                    load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - database errors surface here on first contact
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open study '{name}' in {redact(url)} ({first[:200]}): check --storage") from None
    have = [d.name.lower() for d in study.directions]
    if have != list(space.directions):
        raise UserError(f"study '{name}' in {redact(url)} exists with direction(s) {', '.join(have)} but "
                        f"search={space.name} needs {', '.join(space.directions)}: pass another --study NAME")
    stored_space = study.user_attrs.get("space")
    if stored_space is not None and stored_space != space.name:
        raise UserError(f"study '{name}' in {redact(url)} holds the {stored_space} space, not {space.name}: "
                        f"pass another --study NAME (or search={stored_space})")
    if stored_space is None:
        study.set_user_attr("space", space.name)
    return study


def in_range(values: dict[str, Any], ranges: dict) -> dict[str, float]:
    """The values that lie inside their search range (others are left to the sampler)."""
    out = {}
    for name, value in values.items():
        if name in ranges and value is not None and float(ranges[name]["low"]) <= float(value) <= float(ranges[name]["high"]):
            out[name] = float(value)
    return out


def fail_running(study: optuna.Study, session: str) -> None:
    """Mark this session's trials that were still running (their workers were stopped) as FAIL."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("session") == session:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (Ctrl-C)")
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except Exception as exc:  # noqa: BLE001 - finished in the meantime; leave it
                log.debug("trial %d: %s", t.number, exc)


def fail_stale(url: str, name: str, heartbeat: float | None) -> int:
    """Mark FAIL the trials left RUNNING by a worker that died (killed, machine lost): no heartbeat for two
    beats. Returns how many. Called when a search starts, so a rerun reports them at once instead of
    leaving them RUNNING until some later trial happens to check."""
    if not heartbeat:
        return 0
    study = optuna.load_study(study_name=name, storage=make_storage(url, heartbeat))
    running = lambda: {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}  # noqa: E731
    before = running()
    if not before:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return len(before - running())


def best_trial(study: optuna.Study, space: Space) -> optuna.trial.FrozenTrial | None:
    """The best trial; for several objectives the Pareto-optimal trial with the best first objective."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if not space.multi:
        return study.best_trial
    front = study.best_trials
    sign = 1 if space.directions[0] == "maximize" else -1
    return max(front, key=lambda t: sign * t.values[0])


def best_overrides(t: optuna.trial.FrozenTrial, space: Space, ctx: dict) -> list[str]:
    overrides = list(t.user_attrs.get("overrides") or [])
    if space.name == "pseudo_label":
        t = [o for o in overrides if o.startswith("classify.threshold=")]
        if t:  # the same t for new synthetic sets (augment generate / augment run)
            overrides.append("generate.threshold=" + t[0].split("=", 1)[1])
        if ctx.get("pool"):
            overrides.append(f"classify.synthetic=[{quote(ctx['pool'])}]")
    if space.name == "translator_weights" and ctx.get("family"):
        overrides.insert(0, f"translator={ctx['family']}")
    return list(space.fixed) + overrides


def write_best(path: Path, t: optuna.trial.FrozenTrial, space: Space, study_name: str, url: str, ctx: dict) -> list[str]:
    overrides = best_overrides(t, space, ctx)
    values = {m: float(v) for m, v in zip(space.metrics, t.values)}
    doc = {"space": space.name, "study": study_name, "storage": redact(url), "trial": t.number, "values": values,
           "params": {k: float(v) if isinstance(v, (int, float)) else v for k, v in t.params.items()},
           "overrides": overrides}
    head = (f"# Best trial of study '{study_name}' (search={space.name}): trial {t.number}, "
            + ", ".join(f"{k}={v:.4f}" for k, v in values.items()) + "\n"
            f"# Apply: {space.applies_to}\n"
            "# (flags and key=value overrides given on the command line win over these)\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(head + yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return overrides


def read_best(path: str | os.PathLike) -> list[str]:
    """The overrides of a ``best.yaml`` written by ``augment search`` (for ``--from-search``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / BEST_FILE
    if not p.is_file():
        raise UserError(f"--from-search {path}: no such file: pass the best.yaml of an `augment search` run")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"--from-search {p} is not valid YAML ({str(exc).splitlines()[0]}): pass a best.yaml "
                        "written by `augment search`") from None
    overrides = doc.get("overrides") if isinstance(doc, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise UserError(f"--from-search {p} has no 'overrides' list of key=value strings: pass a best.yaml "
                        "written by `augment search`")
    return overrides
