import json

from augment.progress import StepWatcher, last_step


def test_last_step_reads_the_last_complete_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert last_step(log) == 0  # not written yet
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
    assert last_step(log) == 30  # a half-written last line is skipped


def test_step_watcher_prints_a_status_line_every_interval_off_a_terminal(tmp_path, capsys):
    log = tmp_path / "cgan.jsonl"
    log.write_text(json.dumps({"step": 120}) + "\n")
    now = [0.0]
    w = StepWatcher({"cgan": (log, 600), "classifier": (None, 600)}, desc="train", every_s=60, clock=lambda: now[0])
    w()
    assert capsys.readouterr().out == ""  # not yet: the interval has not passed
    now[0] = 61.0
    w()
    assert capsys.readouterr().out.strip() == "train: cgan 120/600, classifier running"
    log.write_text(json.dumps({"step": 120}) + "\n" + json.dumps({"step": 480}) + "\n")
    now[0] = 90.0
    w()
    assert capsys.readouterr().out == ""
    now[0] = 125.0
    w()
    assert "cgan 480/600" in capsys.readouterr().out
    w.close()


def test_a_disabled_watcher_is_silent(tmp_path, capsys):
    w = StepWatcher({"cgan": (tmp_path / "x.jsonl", 10)}, desc="train", enabled=False, every_s=0, clock=lambda: 1e9)
    w()
    assert capsys.readouterr().out == ""
