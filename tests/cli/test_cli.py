import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from augment.cli import main
from augment.config import build, compose, config_dir, group_options
from augment.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "augment" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "show", "--help"])
    assert "--classes" in capsys.readouterr().out


def test_data_show_on_folder_writes_counts_grid_metrics_and_config(cxr_real, tmp_path, capsys):
    out = tmp_path / "show"
    code = main(["data", "show", "data=folder", f"data.root={cxr_real}", "data.image_size=32",
                 "data.include=[images/jsrt/,images/covid_figure1/]", "--classes", "nodule,pneumonia", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "Nodule" in text and "Pneumonia" in text and "train" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"] == ["Nodule", "Pneumonia"]
    assert metrics["counts"]["train"]["Nodule"] + metrics["counts"]["val"]["Nodule"] + metrics["counts"]["test"]["Nodule"] == 154
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["name"] == "folder" and cfg["classes"] == ["nodule", "pneumonia"]
    assert (out / "samples.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv,needle", [
    (["data", "show", "--classes", "edma"], "did you mean 'Edema'"),
    (["data", "show", "data=nowhere"], "unknown data 'nowhere'"),
    (["data", "show", "data=folder"], "data.root"),
    (["data", "show", "data=folder", "data.root=/definitely/missing"], "does not exist"),
    (["data", "show", "data.image_size=48"], "power of two"),
    (["data", "show", "notanoverride"], "overrides are key=value"),
    (["data", "show", "data.no_such_key=1"], "bad configuration override"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys, tmp_path):
    code = main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len([line for line in err if line.startswith("augment: error")]) == 1 and needle in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_console_script_error_has_no_traceback(tmp_path):
    exe = Path(sys.executable).parent / "augment"
    proc = subprocess.run([str(exe), "data", "show", "--classes", "edma", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("augment: error: unknown class 'edma'")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists(), "a refused command must leave nothing on disk"


def test_every_config_group_option_composes_and_targets_are_allowed():
    for group in ("data", "runtime", "classifier", "generator", "translator", "experiment"):
        for option in group_options(group):
            cfg = compose([f"{group}={option}"])
            assert cfg is not None


def test_build_refuses_foreign_targets():
    with pytest.raises(UserError, match="refusing"):
        build({"_target_": "os.system", "command": "true"})
    with pytest.raises(UserError, match="refusing"):  # exact model targets only, not all of torch.*
        build({"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3})
    model = build({"_target_": "classifiers.model.create_classifier", "model_name": "tiny", "num_classes": 3})
    assert model.num_classes == 3


def test_configs_ship_in_the_wheel(tmp_path):
    """A non-editable install must find the Hydra configs: build the wheel and look inside."""
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("augment-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("augment/configs/") and n.endswith(".yaml")}
    expected = {"augment/configs/" + str(p.relative_to(config_dir())) for p in config_dir().rglob("*.yaml")}
    assert expected and expected <= shipped
    assert "augment/cli.py" in names and "generators/base.py" in names
    # every module of the source tree ships (a package missing from pyproject's list breaks non-editable installs)
    modules = {str(p.relative_to(ROOT)) for top in ("augment", "generators", "classifiers", "cxrbase")
               for p in (ROOT / top).rglob("*.py")}
    assert modules and not (modules - names), sorted(modules - names)


def test_a_dict_valued_setting_takes_the_natural_form():
    from augment.config import compose

    cfg = compose(["experiment=quickstart", "classify.limit_positives={Pneumonia: 40}"])
    assert dict(cfg.classify.limit_positives) == {"Pneumonia": 40}  # the whole dict is set
    assert dict(compose(["data.prevalence={Edema: 0.3}"]).data.prevalence) == {"Edema": 0.3}
    with pytest.raises(UserError, match="bad configuration override"):
        compose(["classify.no_such_key={a: 1}"])
