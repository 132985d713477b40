"""Optuna on a real PostgreSQL server (issue 19, item 4; issue 15, item 10).

A throwaway server on 127.0.0.1 (initdb + pg_ctl, as the ``postgres`` user when the tests run as
root) with password authentication; skipped with the reason when the server binaries or the driver
(``pip install 'augment[postgres]'``) are missing. Two ``augment search`` processes share one study
through ``--storage postgresql://...``; one is killed mid-trial, and the same command resumes.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from augment.errors import UserError
from augment.search import urls

from search_args import PSEUDO


def _server_bin() -> Path | None:
    """The folder of initdb and pg_ctl: PATH, else the newest /usr/lib/postgresql/*/bin."""
    for tool in ("initdb", "pg_ctl"):
        if not shutil.which(tool):
            break
    else:
        return Path(shutil.which("initdb")).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[4]) if
                   Path(p).parts[4].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb into a fresh folder, pg_ctl start on 127.0.0.1:<free port>; stop() stops exactly that
    server (pg_ctl reads the postmaster pid from the folder)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # short: the socket path must fit
        self.data = self.root / "data"
        self.port = _free_port()
        self.user, self.password = "augment", "pw" + secrets.token_hex(8)
        self.run_as: dict = {}
        if os.geteuid() == 0:  # the server refuses to run as root
            try:
                pg = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root and there is no 'postgres' user to run the server as")
            os.chown(self.root, pg.pw_uid, pg.pw_gid)
            self.run_as = {"user": pg.pw_uid, "group": pg.pw_gid}
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            os.chown(pwfile, self.run_as["user"], self.run_as["group"])
        self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        self.url = f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, timeout=120,
                              cwd=self.root, **self.run_as)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout[-1000:]} {done.stderr[-1000:]}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    bindir = _server_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or under /usr/lib/postgresql/*/bin: "
                    "apt-get install postgresql")
    if not (urls._importable("psycopg") or urls._importable("psycopg2")):
        pytest.skip("no PostgreSQL driver: pip install 'augment[postgres]'")
    server = PostgresServer(bindir)
    try:
        yield server
    finally:
        server.stop()


# -- the URL: postgresql:// works whichever driver SQLAlchemy would pick ------------------------------------


def test_a_bare_postgresql_url_gets_an_installed_driver(monkeypatch):
    pytest.importorskip("psycopg")
    url = "postgresql://u:secret@db.example:5432/optuna"
    monkeypatch.setattr(urls, "_default_driver_imports", lambda parsed: True)
    assert urls.storage_url(url) == url  # SQLAlchemy's own choice imports: left as given
    monkeypatch.setattr(urls, "_default_driver_imports", lambda parsed: False)
    assert urls.storage_url(url) == "postgresql+psycopg://u:secret@db.example:5432/optuna"
    short = urls.storage_url("postgres://u:secret@db.example/optuna")
    assert short == "postgresql+psycopg://u:secret@db.example/optuna"
    for other in ("sqlite:///x/study.db", "postgresql+psycopg2://u:p@h/db", "mysql+pymysql://u:p@h/db"):
        assert urls.storage_url(other) == other


def test_no_postgresql_driver_is_one_line_naming_the_extra_without_the_password(monkeypatch):
    monkeypatch.setattr(urls, "_default_driver_imports", lambda parsed: False)
    monkeypatch.setattr(urls, "_importable", lambda module: False)
    with pytest.raises(UserError) as err:
        urls.storage_url("postgresql://u:secret@db.example/optuna")
    assert "augment[postgres]" in str(err.value) and "secret" not in str(err.value)


def test_make_storage_opens_postgresql_url_when_sqlalchemy_defaults_to_another_driver(postgres, monkeypatch):
    """SQLAlchemy 2.0 reads postgresql:// as psycopg2, which the extra does not install."""
    from sqlalchemy.dialects.postgresql import base as pg_base
    from sqlalchemy.dialects.postgresql import psycopg2 as psycopg2_dialect

    from sqlalchemy.engine import make_url

    from augment.search.study import make_storage

    if urls._importable("psycopg2"):
        pytest.skip("psycopg2 is installed: the SQLAlchemy 2.0 default would work as it is")
    monkeypatch.setattr(pg_base, "dialect", psycopg2_dialect.dialect)  # what SQLAlchemy's registry loads
    assert "psycopg2" in make_url(postgres.url).get_dialect().__module__
    storage = make_storage(postgres.url)
    assert storage.get_all_studies() is not None


# -- two workers, one killed mid-trial, the same command resumes ---------------------------------------------


def _search(pool: Path, url: str, out: Path, trials: int) -> list[str]:
    return [sys.executable, "-m", "augment.cli", "search", *PSEUDO, f"search.pool={pool}", "search.heartbeat=2",
            "--storage", url, "--study", "pg", "--trials", str(trials), "--out", str(out)]


def _study_exists(url: str) -> bool:
    """A plain query: opening an optuna storage here would create the tables itself, racing the worker."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(urls.storage_url(url))
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sqlalchemy.text("SELECT 1 FROM studies WHERE study_name = 'pg'")).first())
    except sqlalchemy.exc.DBAPIError:  # no tables yet
        return False
    finally:
        engine.dispose()


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="pg", storage=urls.storage_url(url)).get_trials()


def _wait(predicate, what: str, timeout: float = 300.0, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"a worker exited ({p.returncode}) before {what}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(900)
def test_two_workers_on_postgresql_one_killed_mid_trial_and_resumed(postgres, pool, tmp_path):
    url = postgres.url
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = {k: open(tmp_path / f"{k}.log", "w") for k in ("a", "b")}
    # start_new_session: the kill reaches worker a's whole process group and nothing else
    a = subprocess.Popen(_search(pool, url, tmp_path / "a", 3), cwd=tmp_path, env=env, stdout=logs["a"],
                         stderr=subprocess.STDOUT, start_new_session=True)
    b = None
    try:
        # b joins once a has created the study (two first contacts would race to create its tables)
        _wait(lambda: _study_exists(url), "the study to exist", procs=[a])
        b = subprocess.Popen(_search(pool, url, tmp_path / "b", 2), cwd=tmp_path, env=env, stdout=logs["b"],
                             stderr=subprocess.STDOUT, start_new_session=True)
        running = _wait(lambda: [t for t in _trials(url) if t.state == TrialState.RUNNING
                                 and t.user_attrs.get("worker_pid") == a.pid], "a trial of worker a to run",
                        procs=[a, b])
        killed = running[0].number
        os.killpg(a.pid, signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
        assert b.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    # nobody finished it: RUNNING, or FAIL if worker b saw its heartbeat stop (2 x search.heartbeat)
    assert {t.number: t for t in _trials(url)}[killed].state in (TrialState.RUNNING, TrialState.FAIL)
    b_metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b_metrics["this_run"]["states"] == {"COMPLETE": 2} and b_metrics["storage"].count("***") == 1
    assert postgres.password not in (tmp_path / "b" / "metrics.json").read_text()

    time.sleep(5)  # > 2 heartbeats without a beat: the killed trial is stale
    resumed = subprocess.run(_search(pool, url, tmp_path / "a", 1), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trials = _trials(url)
    assert {t.number: t for t in trials}[killed].state == TrialState.FAIL
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["this_run"]["stored_before"] >= 3 and m["this_run"]["states"] == {"COMPLETE": 1}
    assert m["n_trials"]["RUNNING"] == 0
    assert m["n_trials"]["COMPLETE"] == sum(t.state == TrialState.COMPLETE for t in trials) >= 3
    for folder in ("a", "b"):
        for name in ("config.yaml", "metrics.json", "best.yaml"):
            assert postgres.password not in (tmp_path / folder / name).read_text(), f"{folder}/{name}"
