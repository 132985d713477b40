"""The run folder: --out that cannot be a folder, a refused command leaves the run's config.yaml alone,
secrets never reach config.yaml, and Ctrl-C in a search exits 130 without a traceback."""

import json
import logging
import sys

import pytest

from augment.cli import main
from augment.config import redact_text, redacted

SMOKE = ["experiment=smoke", "runtime=inline", "progress=false"]


def _one_line(err: str) -> bool:
    return "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_out_at_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert main(["data", "show", *SMOKE, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and _one_line(err)
    assert target.read_text() == "mine"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_out_where_no_folder_can_be_made_is_one_line(capsys):
    assert main(["data", "show", *SMOKE, "--out", "/proc/augment-run"]) == 2
    err = capsys.readouterr().err
    assert "cannot create --out /proc/augment-run" in err and _one_line(err)


def test_a_refused_command_does_not_rewrite_the_runs_config(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["data", "show", *SMOKE, "--out", str(out)]) == 0
    before = (out / "config.yaml").read_bytes()
    # generate into the same folder is refused (no trained models there): config.yaml stays the data show one
    assert main(["generate", *SMOKE, "--models", str(tmp_path / "none"), "--out", str(out), "seed=7"]) == 2
    capsys.readouterr()
    assert (out / "config.yaml").read_bytes() == before


def test_a_nested_target_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    code = main(["classify", *SMOKE, "--out", str(tmp_path / "c"),
                 f"+data.extra={{inner: {{_target_: os.system, command: 'touch {marker}'}}}}"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to instantiate 'os.system'" in err and _one_line(err)
    assert not marker.exists() and not (tmp_path / "c").exists()


def test_secrets_are_masked_in_saved_configs(tmp_path, capsys):
    out = tmp_path / "run"
    url = "postgresql+psycopg://bob:hunter2@db.example:5432/studies"
    assert main(["data", "show", *SMOKE, f"search.storage='{url}'", "+runtime.token=tok-123", "--out", str(out)]) == 0
    text = (out / "config.yaml").read_text()
    assert "hunter2" not in text and "tok-123" not in text
    assert "postgresql+psycopg://bob:***@db.example:5432/studies" in text
    assert "hunter2" not in (out / "metrics.json").read_text()


@pytest.mark.parametrize("text,want", [
    ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
    ("mysql+pymysql://root:pw@127.0.0.1:3306/x", "mysql+pymysql://root:***@127.0.0.1:3306/x"),
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
    ("ray://head:10001", "ray://head:10001"),
    ("postgresql://user@h/db", "postgresql://user@h/db"),
])
def test_redact_text(text, want):
    assert redact_text(text) == want


def test_redacted_masks_secret_keys_and_leaves_the_rest():
    cfg = {"runtime": {"token": "t", "address": "ray://h:1"}, "db_password": "", "n": 3, "l": ["a://u:p@h"]}
    assert redacted(cfg) == {"runtime": {"token": "***", "address": "ray://h:1"}, "db_password": "", "n": 3,
                             "l": ["a://u:***@h"]}
    assert cfg["runtime"]["token"] == "t"  # a copy: the workers still get the real value


def test_ctrl_c_in_search_exits_130_and_keeps_the_summary(tmp_path, capsys, monkeypatch):
    import augment.search as search_stage

    def interrupted(payload):
        raise KeyboardInterrupt

    monkeypatch.setattr(search_stage, "run_worker", interrupted)
    out = tmp_path / "s"
    code = main(["search", "search=pseudo_label", *SMOKE, "search.baseline=false", "--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130
    assert "augment: interrupted:" in err and "rerun the same command" in err and "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["command"] == "search" and metrics["this_run"]["interrupted"] is True


def test_optuna_does_not_print_a_traceback_for_ctrl_c():
    from augment.search.worker import _NoInterruptTraceback, quiet_interrupts

    quiet_interrupts()
    quiet_interrupts()  # once per process, however often a worker starts
    logger = logging.getLogger("optuna.study._optimize")
    assert sum(isinstance(f, _NoInterruptTraceback) for f in logger.filters) == 1
    records = {}
    for exc in (KeyboardInterrupt(), ValueError("boom")):
        try:
            raise exc
        except BaseException:
            records[type(exc).__name__] = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                                                            "Trial 3 failed: %r", (exc,), sys.exc_info())
    assert all(logger.filter(r) for r in records.values())  # the line itself is kept
    assert records["KeyboardInterrupt"].exc_info is None  # its traceback is dropped
    assert records["ValueError"].exc_info[0] is ValueError  # other errors keep theirs
    text = logging.Formatter().format(records["KeyboardInterrupt"])
    assert "Trial 3 failed: KeyboardInterrupt()" in text and "Traceback" not in text


def test_sigterm_is_handled_as_ctrl_c(tmp_path, capsys, monkeypatch):
    import os
    import signal
    import time

    import augment.cli as cli

    def stage(cfg, out):
        (out / "half-written").write_text("x")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the stage")

    monkeypatch.setattr(cli, "resolve_target", lambda target: stage)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "d"
    assert main(["data", "show", *SMOKE, "--out", str(out)]) == 130
    assert "augment: interrupted" in capsys.readouterr().err
    assert not out.exists()  # created by this command and interrupted before any finished work: no trace
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_rerun_marks_trials_of_a_dead_worker_fail(tmp_path):
    import time

    import optuna

    from augment.search.study import fail_stale, make_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=make_storage(url))
    trial = study.ask()  # a worker took it, beat once, then died
    study._storage.record_heartbeat(trial._trial_id)
    assert fail_stale(url, "s", 1) == 0  # alive (the beat is fresh)
    time.sleep(4)  # more than two beats (grace = 2 s), with slack for a busy machine
    assert fail_stale(url, "s", 1) == 1
    assert study.get_trials(deepcopy=False)[0].state.name == "FAIL"
    assert fail_stale(url, "s", None) == 0
