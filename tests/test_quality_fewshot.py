"""benchmarks/quality_fewshot.py: few-shot recipes at equal CPU time (CPU marks of one run, metrics, skip)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from generators.cgan import CGAN
from generators.checkpoint import load_checkpoint
from generators.train import CheckpointConfig, HookBase, LogConfig, LoopConfig, TrainState, fit

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("quality_fewshot", ROOT / "benchmarks" / "quality_fewshot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


qf = _script()


class Xrays(Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
        self.labels = torch.eye(2)[torch.arange(n) % 2]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "labels": self.labels[i]}


def _cgan() -> CGAN:
    torch.manual_seed(0)
    return CGAN(classes=["Edema", "Hernia"], image_size=32, z_dim=8, g_channels=4, d_channels=4)


class FakeCPU(HookBase):
    """Advance a fake process clock by 10 s per step (runs before CPUMarks)."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def after_step(self, state: TrainState) -> None:
        self.clock[0] += 10.0


def test_cpu_marks_snapshot_stop_and_continue_the_same_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]  # process time already spent before training: not counted
    monkeypatch.setattr(qf.time, "process_time", lambda: clock[0])
    run = tmp_path / "run"
    data = Xrays()

    def train(marks: list[float]) -> None:
        fit(_cgan(), data, LoopConfig(batch_size=4, max_steps=100, seed=1),
            checkpoint=CheckpointConfig(run / "model", every=1000), logs=LogConfig(progress=False),
            hooks=[FakeCPU(clock), qf.CPUMarks(run, marks, save_every_s=1e9)])

    train([0.5])  # 30 CPU-s: after step 3; the hook stops the run there (state.stop)
    book = json.loads((run / "marks.json").read_text())
    assert book["marks"]["0.5"]["step"] == 3 and book["marks"]["0.5"]["cpu_s"] == pytest.approx(30.0)
    ck = load_checkpoint(run / "model" / "checkpoint.pt")
    assert ck["step"] == 3 and ck["done"] is False  # stopped early, resumable
    assert load_checkpoint(run / "marks" / "0.5.pt")["step"] == 3

    train([0.5, 1.0])  # continues from step 3 with its 30 CPU-s: 60 CPU-s after step 6
    book = json.loads((run / "marks.json").read_text())
    assert book["marks"]["1"]["step"] == 6 and book["marks"]["1"]["cpu_s"] == pytest.approx(60.0)
    assert book["marks"]["0.5"]["step"] == 3  # the earlier mark is kept, not re-measured
    assert load_checkpoint(run / "marks" / "1.pt")["step"] == 6
    assert load_checkpoint(run / "model" / "checkpoint.pt")["step"] == 6

    with pytest.raises(qf.UserError, match="lies before"):  # a mark before the checkpoint cannot be measured
        train([0.2, 0.5, 1.0, 2.0])


def test_a_hook_can_stop_fit_and_the_run_resumes(tmp_path: Path) -> None:
    class StopAt(HookBase):
        def after_step(self, state: TrainState) -> None:
            state.stop = state.step == 2

    seen: list[int] = []
    cfg = CheckpointConfig(tmp_path, every=1000)
    fit(_cgan(), Xrays(), LoopConfig(batch_size=4, max_steps=5), checkpoint=cfg,
        logs=LogConfig(every=1, progress=False, on_metrics=lambda s, m: seen.append(s)), hooks=[StopAt()])
    assert seen == [1, 2]
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 2 and ck["done"] is False
    fit(_cgan(), Xrays(), LoopConfig(batch_size=4, max_steps=5), checkpoint=cfg,
        logs=LogConfig(every=1, progress=False, on_metrics=lambda s, m: seen.append(s)))
    assert seen == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["done"] is True


@pytest.mark.parametrize("args, message", [
    (["--recipes", "today,difaug"], "unknown recipe 'difaug': did you mean 'diffaug'?"),
    (["--datasets", "kermani"], "unknown dataset 'kermani': did you mean 'kermany'?"),
    (["--minutes", "5,2"], "increasing positive CPU-minute marks"),
    (["--datasets", "kermany", "--real-root", "{tmp}/nowhere"], "needs the shared real data"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                                  message: str) -> None:
    out = tmp_path / "out"
    assert qf.main(["--out", str(out), *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_quick_curves_on_the_phantom(tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "curves"
    recipes = ["today", "diffaug"]
    base = ["--out", str(out), "--quick", "--recipes", ",".join(recipes), "--datasets", "phantom"]
    assert qf.main([*base, "--minutes", "0.05"]) == 0
    first = {r: json.loads((out / "phantom" / r / "eval.json").read_text())["0.05"] for r in recipes}

    caplog.set_level(logging.INFO, logger="generators.train")
    assert qf.main(base) == 0  # the quick marks 0.05,0.1: each run continues from its 0.05 mark
    for r in recipes:
        resumed = [m.getMessage() for m in caplog.records if "resumed" in m.getMessage() and f"/{r}/model/" in m.getMessage()]
        assert resumed == [f"resumed {out / 'phantom' / r / 'model' / 'checkpoint.pt'} at step {first[r]['step']}"]

    res = json.loads((out / "curves.json").read_text())
    assert "process_time" in res["clock"]
    phantom = res["results"]["phantom"]
    assert set(phantom["runs"]) == set(recipes)
    for r in recipes:
        marks = phantom["runs"][r]
        assert [m["minute"] for m in marks] == [0.05, 0.1]
        assert marks[0] == first[r]  # measured once
        cpu = [m["cpu_s"] for m in marks]
        assert cpu[0] < cpu[1]
        assert all(0 <= c - m["minute"] * 60 < 2.0 for c, m in zip(cpu, marks))  # the first step past each mark
        assert 0 < marks[0]["step"] <= marks[1]["step"]
        for m in marks:
            assert math.isfinite(m["kid"]) and math.isfinite(m["fid"]) and m["kid_sd"] >= 0 and m["fid"] >= 0
            assert m["n_samples"] == 40
            fid = m["class_fidelity"]
            assert set(fid) == {"Edema", "Hernia", "Effusion"} and all(0.0 <= v <= 1.0 for v in fid.values())
        assert (out / "phantom" / r / "grid_0.1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    floor = phantom["floor"]
    assert math.isfinite(floor["kid"]) and math.isfinite(floor["fid"]) and floor["n_real_test"] > 0
    assert all(0.0 <= v <= 1.0 for v in floor["class_fidelity"].values() if v is not None)
    md = (out / "curves.md").read_text()
    assert "python benchmarks/quality_fewshot.py --out" in md and "--quick" in md
    assert md.count("| phantom | today |") == 2 and md.count("| phantom | diffaug |") == 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in {".pt", ".json"} and p.parent != out)
    stamps = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    assert qf.main(base) == 0  # finished: nothing trained, measured or judged again
    printed = capsys.readouterr().out
    assert "training to" not in printed and "judge:" not in printed and " at 0.1 CPU-min" not in printed
    assert {p: p.stat().st_mtime_ns for p in files} == stamps


def test_recipes_and_datasets_compose_to_what_they_say(tmp_path: Path) -> None:
    args = qf.parse(["--out", str(tmp_path), "--datasets", "phantom", "--real-root", str(tmp_path)])
    seen = set()
    for name, overrides in qf.RECIPES.items():
        c = qf.compose([*qf.dataset_overrides("phantom", args), *overrides])
        g, fs = c.generator, c.generator.fewshot
        seen.add((g.arch, g.loss, g.spectral_norm, fs.diffaug, fs.diffaug_p, fs.diffaug_adaptive, fs.lecam_weight))
        assert g.loss == "bce" and (g.arch == "fastgan") == (name == "fastgan+diffaug") and g.spectral_norm == (g.arch == "fastgan")
        assert (fs.diffaug is None) == (name == "today")
        assert fs.diffaug in (None, "translation,cutout,brightness,contrast")
        assert fs.lecam_weight == (0.1 if "lecam" in name else 0.0)
        assert (fs.diffaug_adaptive, fs.diffaug_p) == ((True, 0.0) if name == "ada+lecam" else (False, 1.0))
    assert len(seen) == len(qf.RECIPES)  # five different recipes
    p = qf.compose(qf.dataset_overrides("phantom", args))
    assert (p.data.image_size, list(p.classes), dict(p.classify.limit_positives)) == (
        64, ["Edema", "Hernia", "Effusion"], {"Edema": 30, "Hernia": 30, "Effusion": 30})
    k = qf.compose(qf.dataset_overrides("kermany", args))
    assert (k.data.image_size, list(k.classes), dict(k.classify.limit_positives)) == (64, ["Pneumonia"], {"Pneumonia": 40})
    assert (k.generator.g_channels, k.generator.d_channels, k.data.root) == (32, 32, str(tmp_path))
