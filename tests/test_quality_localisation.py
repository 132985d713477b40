"""benchmarks/quality_localisation.py --translators: translator learning curves on nih_bbox (quick mode)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from augment.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CXR_LESIONS = ROOT.parent / "shared" / "data" / "cxr-lesions"
CXR_REAL = ROOT.parent / "shared" / "data" / "cxr-real"


def _script():
    spec = importlib.util.spec_from_file_location("quality_localisation", ROOT / "benchmarks" / "quality_localisation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


ql = _script()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (CXR_LESIONS / "nih_bbox" / "boxes.csv").is_file() or not (CXR_LESIONS / "covidqu_infection").is_dir() or not (CXR_REAL / "labels.csv").is_file():
        pytest.skip("../shared/data/cxr-lesions or cxr-real is not beside the project")
    out = tmp_path_factory.mktemp("loc") / "run"
    assert ql.main(["--quick", "--out", str(out), "--translators", "fixed_point,taggan", "--fewshot", "--covid",
                    "--lesions", str(CXR_LESIONS), "--real", str(CXR_REAL)]) == 0
    return out


def _rows(text: str, source: str) -> dict[str, list[float]]:
    """Table rows of ``source`` in the per-finding box table: finding -> the 7 accuracies."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 + len(ql.COLS) and cells[2] == source:
            out[cells[0]] = [float(c) for c in cells[3:]]
    return out


@pytest.mark.slow
def test_translator_rows_at_every_mark(quick_run: Path) -> None:
    text = (quick_run / "tables.md").read_text()
    metrics = json.loads((quick_run / "metrics.json").read_text())
    marks = ql.QUICK_MINUTES  # --quick's CPU-minute marks
    for fam in ("fixed_point", "taggan"):
        for m in marks:
            rows = _rows(text, f"{fam} @ {m:g} CPU-min")
            assert "mean" in rows and len(rows) >= 2, (fam, m, rows)
            for finding, acc in rows.items():
                assert all(0.0 <= a <= 1.0 for a in acc), (fam, m, finding, acc)
                iobb01, iobb025, iobb05 = acc[:3]
                assert iobb01 >= iobb025 >= iobb05, (fam, m, finding, acc)
        curve = metrics["translators"][fam]
        assert [c["minutes"] for c in curve["marks"]] == marks
        for fold in curve["folds"].values():  # marks increase in CPU time and in steps
            cpu = [m["train_cpu_s"] for m in fold["marks"]]
            steps = [m["step"] for m in fold["marks"]]
            assert [c >= 60 * m for c, m in zip(cpu, marks)] == [True, True]
            assert cpu[0] < cpu[1] and 1 <= steps[0] < steps[1], fold
        table = curve["marks"][-1]["boxes"]["mean"]
        assert table["iobb@0.1"] >= table["iobb@0.25"] >= table["iobb@0.5"]
    assert "r1" in " ".join(metrics["translators"]["fixed_point"]["settings"]["overrides"])  # --fewshot reached it
    assert metrics["translators"]["fixed_point"]["settings"]["model_cfg"]["n_critic"] == 1
    assert metrics["translators"]["taggan"]["settings"]["model_cfg"]["fewshot"]["lecam_weight"] == 0.1


@pytest.mark.slow
def test_says_what_trained_on_what(quick_run: Path) -> None:
    metrics = json.loads((quick_run / "metrics.json").read_text())
    nih = metrics["trained_on"]["nih_bbox"]
    assert "minus every nih_bbox patient" in nih["classifier"] and "No Finding" in nih["translators"]
    for k in ("0", "1"):
        assert f"nih_bbox fold {1 - int(k)}" in nih["folds"][k]["translators"]
        n = metrics["folds"][k]
        assert 0 < n["translator_train_normals"] < n["translator_train_images"] <= n["train_images"]
    head = (quick_run / "tables.md").read_text().split("### ")[0]
    assert re.search(r"translators \(fixed_point, taggan\) of fold k: the same images restricted to No Finding", head)
    for k in ("0", "1"):
        n = metrics["folds"][k]
        assert f"fold {k} {n['translator_train_images']} ({n['translator_train_normals']} normal)" in head
    assert "process CPU time" in head and "lambda_r1=1" in head


@pytest.mark.slow
def test_covid_infection_curves(quick_run: Path) -> None:
    """The COVID part: translators scored against the infection masks beside random and Grad-CAM, trained
    on folds split by near-duplicate group."""
    metrics = json.loads((quick_run / "metrics.json").read_text())
    covid = metrics["covidqu_infection"]
    assert "near-duplicate" in covid["trained_on"]["scored"] and "never the masks" in covid["trained_on"]["classifier"]
    for k in ("0", "1"):
        f = covid["folds"][k]
        assert f["train_images"] == f["train_cxr_real"] + f["train_covidqu"] and 0 < f["train_normal"] < f["train_images"]
        assert f"covidqu_infection fold {1 - int(k)}" in f["trained_on"]
    text = (quick_run / "tables.md").read_text().split("### covidqu_infection")[1]
    for fam in ("fixed_point", "taggan"):
        assert [m["minutes"] for m in covid["translators"][fam]["marks"]] == ql.QUICK_MINUTES
        for m in covid["translators"][fam]["marks"]:
            row = next(line for line in text.splitlines() if line.startswith(f"| {fam} @ {m['minutes']:g} CPU-min |"))
            vals = [float(c) for c in row.strip("|").split("|")[1:] if c.strip() != "-"]
            assert len(vals) == 8 and all(0.0 <= v <= 1.0 for v in vals), row
            assert m["masks"]["Pneumonia"]["detection_auc"] is not None  # normals are scored
    assert "| random (mean of seeds) |" in text and "| gradcam |" in text


@pytest.mark.slow
def test_curve_figure_is_a_png(quick_run: Path) -> None:
    fig = quick_run / "curves.png"
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((quick_run / "metrics.json").read_text())["figure"] == str(fig)


@pytest.mark.parametrize("argv, words", [
    (["--translators", "stargan"], "unknown translator family stargan"),
    (["--translators", "fixed_point", "--minutes", "10,5"], "must be positive and increasing"),
    (["--translators", "fixed_point", "--translator-overrides", "translator.nonsense=1"], "bad configuration override"),
    (["--translators", "taggan", "--translator-overrides", "translator.g_width=abc"], "cannot build translator taggan"),
])
def test_bad_arguments_write_nothing(tmp_path: Path, argv: list[str], words: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(UserError, match=words):
        ql.main(["--quick", "--out", str(out), *argv])
    assert not out.exists()


def test_family_overrides_reach_only_their_family() -> None:
    ov = ["translator.g_width=16", "fixed_point:translator.n_res=2", "taggan:translator.n_res=3", "data.root=/a:b"]
    assert ql.family_overrides("fixed_point", ov) == ["translator.g_width=16", "translator.n_res=2", "data.root=/a:b"]
    assert ql.family_overrides("branched", ov) == ["translator.g_width=16", "data.root=/a:b"]
