"""The device script's --tiny mode (CI runs it, so the script cannot rot before a GPU session uses it)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_script", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_tiny_mode_runs_every_section_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("AUGMENT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "gpu"
    assert _gpu_script().main(["--tiny", "--out", str(out), "--device", "cpu"]) == 0
    res = json.loads((out / "gpu.json").read_text())
    secs = res["sections"]
    assert set(secs) == {"env", "tests", "classifier", "gans", "fid", "generate", "long"}
    assert not [k for k, v in secs.items() if "error" in v], secs
    assert secs["tests"]["result"]["returncode"] == 0 and secs["tests"]["result"]["counts"].get("skipped", 0) >= 1
    assert {v["family"] for v in secs["gans"]["result"].values()} == {"cgan", "ucgan", "fixed_point", "taggan", "branched"}
    assert all(v["steps_per_s"] > 0 for v in secs["gans"]["result"].values())
    assert secs["classifier"]["result"]["32"]["train_images_per_s"] > 0
    assert secs["generate"]["result"]["n"] >= 1 and secs["generate"]["result"]["images_per_s"] > 0
    assert "fid" in json.dumps(secs["long"]["result"]["image_metrics"]).lower()
    md = (out / "gpu.md").read_text()
    assert "## GAN training" in md and "## augment generate" in md and "Errors" not in md
    assert (out / "samples.png").stat().st_size > 100 and (out / "pytest.log").is_file()


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    gpu = _gpu_script()
    monkeypatch.setattr(gpu, "sec_fid", lambda *a: (_ for _ in ()).throw(RuntimeError("no extractor")))
    out = tmp_path / "gpu"
    code = gpu.main(["--tiny", "--out", str(out), "--device", "cpu", "--skip", "tests", "gans", "generate", "long"])
    assert code == 1
    secs = json.loads((out / "gpu.json").read_text())["sections"]
    assert secs["fid"]["error"] == "RuntimeError: no extractor" and "result" in secs["classifier"]
    assert secs["long"] == {"skipped": "--skip"}
    assert "`fid`: RuntimeError: no extractor" in (out / "gpu.md").read_text()
