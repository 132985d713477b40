import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from augment.cli import main
from stage_args import TINY

RUN = [*TINY, "generate.n=12", "generate.shard_size=16", "generate.batch_size=8", "classify.epochs=1",
       "evaluate.kid_subsets=5"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    assert main(["run", *RUN, "--out", str(out)]) == 0
    return out


def test_run_smoke_writes_every_step_and_the_report(smoke_run):
    for step in ("train", "baseline", "synthetic", "augmented", "evaluate"):
        assert (smoke_run / step).is_dir(), step
    m = json.loads((smoke_run / "metrics.json").read_text())
    assert set(m["steps"]) == {"train", "baseline", "generate", "augmented", "evaluate", "report"}
    assert len(list((smoke_run / "synthetic" / "images").glob("*.png"))) == 12


def test_report_structure(smoke_run):
    md = (smoke_run / "report.md").read_text()
    for heading in ("## Configuration", "## Real vs synthetic samples",
                    "## Does the synthetic data help? Arms at an equal training budget",
                    "## Image quality", "## Mask quality", "## Timings and throughput", "## Versions"):
        assert heading in md, heading
    # the headline is the fair comparison: every arm, the same steps, paired differences against real and the best control
    steps = set()
    for arm in ("real", "classic", "oversample", "synthetic", "synthetic+classic"):
        row = re.search(rf"^\| {re.escape(arm)} \| [0-9.]+ ± [0-9.]+ \|.*\| ([0-9]+) \|$", md, re.M)
        assert row, arm
        steps.add(row.group(1))
    assert len(steps) == 1  # equal budget
    assert "| synthetic − real |" in md and re.search(r"\| synthetic − (real|classic|oversample) \(best control\) \|", md)
    m = json.loads((smoke_run / "augmented" / "metrics.json").read_text())
    assert m["mode"] == "arms" and len({n for a in m["steps"].values() for n in a.values()}) == 1
    assert re.search(r"requested at pseudo-label threshold t=[0-9.]+; kept [0-9]+ \(Edema [0-9]+", md)
    html = (smoke_run / "report.html").read_text()
    assert html.count("<img") >= 2 and html.count("data:image/png;base64,") == html.count("<img")
    assert "report_files/" not in html  # self-contained: no links to files beside it
    assert html.count("<table>") >= 4


def test_rerun_skips_done_steps_and_from_reruns_later_ones(smoke_run, capsys):
    before = (smoke_run / "baseline" / "done.json").read_text()
    assert main(["run", *RUN, "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 6
    assert main(["run", *RUN, "--out", str(smoke_run), "--from", "augmented"]) == 0
    out = capsys.readouterr().out
    assert "[baseline] up to date" in out and "[augmented] running" in out and "[report] running" in out
    assert (smoke_run / "baseline" / "done.json").read_text() == before
    # a changed classify setting reruns baseline and everything after it, not train
    assert main(["run", *RUN, "--out", str(smoke_run), "classify.lr=0.002"]) == 0
    out = capsys.readouterr().out
    assert "[train] up to date" in out and "[baseline] running" in out and "[generate] running" not in out.split("[baseline]")[0]
    # run.arms=[] gives the single real + synthetic run against the baseline, and only the comparison reruns
    assert main(["run", *RUN, "--out", str(smoke_run), "classify.lr=0.002", "run.arms=[]"]) == 0
    out = capsys.readouterr().out
    assert "[baseline] up to date" in out and "[augmented] running" in out
    md = (smoke_run / "report.md").read_text()
    assert "## Classifier AUC on the held-out test split" in md and "Arms at an equal training budget" not in md
    assert re.search(r"\| Edema \| [0-9.]+ \| [0-9.]+ \| [+-][0-9.]+ \|", md)


def test_bad_from_step(tmp_path, capsys):
    assert main(["run", *RUN, "--out", str(tmp_path / "r"), "--from", "nowhere"]) == 2
    assert "choose one of" in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    png = tmp_path / "report.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400", f"--screenshot={png}",
                    (smoke_run / "report.html").as_uri()], check=True, timeout=120, capture_output=True)
    from PIL import Image
    import numpy as np

    arr = np.asarray(Image.open(png).convert("L"))
    assert arr.std() > 10, "the rendered report is blank"
    assert (arr < 128).mean() > 0.01


def test_a_failed_step_keeps_the_finished_steps_for_the_rerun(tmp_path, monkeypatch, capsys):
    """A refusal in a late step must not delete the models an earlier step trained."""
    from augment.errors import UserError
    from augment.stages import classify, train

    def fake_train(cfg, folder, overrides=None):
        (folder / "models").mkdir()
        return {"models": {"cgan": {"steps_per_second": 1.0, "seconds": 1.0}}}

    def refuse(cfg, folder):
        raise UserError("no positive image of Hernia in the test split")

    monkeypatch.setattr(train, "train", fake_train)
    monkeypatch.setattr(classify, "classify", refuse)
    out = tmp_path / "r"
    assert main(["run", *RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no positive image of Hernia" in err and "the same command resumes" in err and "Traceback" not in err
    assert (out / "train" / "done.json").is_file() and (out / "train" / "models").is_dir()
    assert not (out / "baseline" / "done.json").exists()


def test_report_localisation_section_has_the_tables_and_the_overlays(tmp_path):
    """evaluate.localisation's scores become a report section: the box and mask tables of each set and its
    overlay figure copied beside the report (the HTML inlines it)."""
    from augment.report import _localisation_section

    run, figs = tmp_path / "run", tmp_path / "run" / "report_files"
    figs.mkdir(parents=True)
    fig = tmp_path / "evaluate" / "localisation_nih_bbox.png"
    fig.parent.mkdir()
    fig.write_bytes(b"\x89PNG fake")
    row = {"n_boxes": 2, "iobb@0.1": 0.5, "iobb@0.25": 0.25, "iobb@0.5": 0.0, "iou@0.1": 0.5, "iou@0.25": 0.0,
           "iou@0.5": 0.0, "pointing": 0.5}
    loc = {"sources": ["random", "gradcam"], "seed": 0, "classifier": None, "translators": {},
           "nih_bbox": {"n_images": 2, "n_boxes": 2, "size": 32, "figure": str(fig), "masks": {},
                        "boxes": {"random": {"Effusion": row, "mean": row}, "gradcam": {"Effusion": {**row, "pointing": 1.0},
                                                                                       "mean": row}}},
           "covidqu_infection": {"n_images": 4, "n_boxes": 0, "size": 32, "boxes": {},
                                 "masks": {"random": {"Pneumonia": {"dice_mean": 0.2, "detection_auc": 0.5}}}}}
    md = "\n".join(_localisation_section(loc, run, figs))
    assert "## Localisation on real lesion ground truth" in md and "Mask sources: random, gradcam" in md
    assert "### Box localisation: nih_bbox (2 images, 2 boxes, 32 px" in md
    assert "| Effusion | gradcam | 2 | 0.500 | 0.250 | 0.000 | 0.500 | 0.000 | 0.000 | 1.000 |" in md
    assert "### Lesion masks: covidqu_infection" in md and "| Pneumonia | random | 0.200 |" in md
    assert "![localisation overlays: nih_bbox](report_files/localisation_nih_bbox.png)" in md
    assert (figs / "localisation_nih_bbox.png").read_bytes() == fig.read_bytes()
    assert "Overlays: `" not in md  # the figure is shown, not its path


def test_run_without_the_baseline_step_uses_the_real_arm(tmp_path, capsys):
    """run.baseline=false skips the real-only step (the arms' real arm is that comparison); evaluate takes its
    domain features from the real arm's seed-0 model; without arms the flag is refused in one line."""
    out = tmp_path / "nobase"
    assert main(["run", *RUN, "run.baseline=false", "--out", str(out)]) == 0
    assert "[baseline] skipped: run.baseline=false" in capsys.readouterr().out
    assert not list((out / "baseline").glob("seed*"))
    ev = json.loads((out / "evaluate" / "metrics.json").read_text())
    assert ev["image_quality"]["feature_checkpoint"] == str((out / "augmented" / "real" / "seed0" / "best.pt").resolve())
    assert "Arms at an equal training budget" in (out / "report.md").read_text()
    assert main(["run", *RUN, "run.baseline=false", "run.arms=[]", "--out", str(tmp_path / "bad")]) == 2
    assert "run.baseline=false needs the arms" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing written
