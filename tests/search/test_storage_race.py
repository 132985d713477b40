"""Workers sharing one SQLite study never claim the same enqueued trial (optuna#4002, seen in CI)."""

from __future__ import annotations

import multiprocessing as mp

import optuna
import pytest

from augment.search.study import SQLiteStorage, make_storage, sqlite_path

ASKS = 30


def _claim(url: str, start, out) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="race", storage=make_storage(url))
    start.wait()
    out.put([study.ask().number for _ in range(ASKS)])


def test_concurrent_workers_claim_each_enqueued_trial_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="race", storage=make_storage(url))
    for i in range(3 * ASKS):
        study.enqueue_trial({"x": i})
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(url, start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    claimed = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    numbers = [n for got in claimed for n in got]
    assert len(numbers) == 3 * ASKS
    assert len(set(numbers)) == len(numbers), "two workers claimed the same trial"
    assert (tmp_path / "study.db.lock").exists()


@pytest.mark.parametrize("url,path", [
    ("sqlite:////tmp/x/study.db", "/tmp/x/study.db"),
    ("sqlite:///rel/study.db", "rel/study.db"),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("postgresql://u:p@h/db", None),
])
def test_sqlite_path(url, path):
    assert sqlite_path(url) == path


def test_only_file_backed_sqlite_gets_the_lock(tmp_path):
    assert isinstance(make_storage(f"sqlite:///{tmp_path / 'a.db'}"), SQLiteStorage)
    assert not isinstance(make_storage("sqlite:///:memory:"), SQLiteStorage)
