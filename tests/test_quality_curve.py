"""benchmarks/quality_curve.py: one augment run per low-data point, gathered into one table and figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_curve.py"


def _module():
    spec = importlib.util.spec_from_file_location("quality_curve", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_point_override_limits_every_class():
    mod = _module()
    assert mod.point_override("20", ["Edema", "Hernia"]) == "classify.limit_positives={Edema:20,Hernia:20}"
    assert mod.point_override("all", ["Edema"]) == "classify.limit_positives={}"


@pytest.mark.slow
def test_curve_runs_each_point_with_its_own_generators_and_gathers_them(tmp_path, capsys):
    mod = _module()
    out = tmp_path / "curve"
    run = ["experiment=smoke", "run.translator=null", "run.baseline=false", "runtime=inline", "classify.steps=3",
           "train.max_steps=2", "generate.n=8", "generate.allow_short=true", "evaluate.kid_subsets=2"]
    shift = "experiment=smoke data.seed=7 data.n=200 runtime=inline"
    argv = ["--out", str(out), "--classes", "Edema,Effusion", "--points", "5,all", "--seeds", "0,1", "--shift", shift,
            "--", *run]
    assert mod.main(argv) == 0
    for point, limit in (("5", {"Edema": 5, "Effusion": 5}), ("all", {})):
        cfg = (out / f"positives_{point}" / "config.yaml").read_text()
        assert ("limit_positives: {}" in cfg) if not limit else ("Edema: 5" in cfg)
        # the generators of the point trained on the point's limited data
        assert (out / f"positives_{point}" / "train" / "models" / "cgan" / "checkpoint.pt").is_file()
        assert json.loads((out / f"shift_{point}" / "metrics.json").read_text())["comparison"]
    g = json.loads((out / "curve.json").read_text())
    assert list(g["comparisons"]) == ["5", "all"]
    assert g["budgets"]["5"]["n_real_train"] < g["budgets"]["all"]["n_real_train"]
    assert set(g["shift"]["comparisons"]) == {"5", "all"}
    md = (out / "curve.md").read_text()
    assert md.count("| 5 |") == 2 and md.count("| all |") == 2 and "shifted set" in md  # internal and shifted rows
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curve_shift.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert mod.main(argv) == 0  # a rerun trains nothing
    assert "$ " not in capsys.readouterr().out
