"""Hostile inputs: no code runs from a config, a search's best.yaml or a checkpoint's model_cfg.

Each vector tries to create a marker file; the test requires a one-line refusal (exit 2, no
traceback) and no marker.
"""

from __future__ import annotations

import pytest
import torch

from augment.cli import main
from augment.config import check_targets, compose
from augment.errors import UserError
from augment.models import load_model
from generators.checkpoint import save_checkpoint

VECTORS = ["torch.hub.load", "torch.load", "torch.utils.cpp_extension.load_inline", "torch.ops.load_library",
           "torch.os.system", "os.system", "builtins.exec", "timm.models.load_checkpoint"]


@pytest.mark.parametrize("target", VECTORS)
def test_only_exact_model_targets_are_built(target):
    with pytest.raises(UserError, match="refusing to instantiate"):
        check_targets({"_target_": target})
    with pytest.raises(UserError, match="refusing to instantiate"):  # nested too
        check_targets({"model": {"_target_": "generators.cgan.CGAN", "inner": [{"_target_": target}]}})


def test_every_target_of_the_config_tree_is_allowed():
    for group, option in [("generator", "cgan"), ("generator", "ucgan"), ("translator", "fixed_point"),
                          ("translator", "taggan"), ("translator", "branched"), ("classifier", "resnet50")]:
        check_targets(compose([f"{group}={option}"]))


def test_a_target_on_the_command_line_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    code = main(["classify", "experiment=smoke", "runtime=inline", "--out", str(tmp_path / "c"),
                 "classifier._target_=torch.os.system", f"+classifier._args_=['touch {marker}']"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to instantiate" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "c").exists()


def test_a_target_in_a_best_yaml_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    best = tmp_path / "best.yaml"
    best.write_text(f"overrides:\n  - classifier._target_=torch.os.system\n  - \"+classifier._args_=['touch {marker}']\"\n")
    code = main(["classify", "experiment=smoke", "runtime=inline", "--from-search", str(best),
                 "--out", str(tmp_path / "c")])
    assert code == 2 and "refusing to instantiate" in capsys.readouterr().err and not marker.exists()


def _checkpoint(path, model_cfg):
    save_checkpoint(path, {"model_cfg": model_cfg, "classes": ["Edema"], "image_size": 32, "step": 1,
                           "state_dict": {"w": torch.zeros(1)}})
    return path


def test_a_checkpoint_whose_model_cfg_runs_code_is_refused(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = _checkpoint(tmp_path / "evil" / "checkpoint.pt",
                       {"_target_": "torch.os.system", "_args_": [f"touch {marker}"]})
    with pytest.raises(UserError, match="refusing to instantiate"):
        load_model(ckpt)
    with pytest.raises(UserError, match="refusing to instantiate"):
        load_model(ckpt, kind="sampler")
    assert not marker.exists()


def test_generate_refuses_an_evil_sampler_checkpoint(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    _checkpoint(tmp_path / "run" / "models" / "cgan" / "checkpoint.pt",
                {"_target_": "torch.os.system", "_args_": [f"touch {marker}"]})
    code = main(["generate", "experiment=smoke", "runtime=inline", "--classes", "edema", "--n", "2",
                 "--models", str(tmp_path / "run"), "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to instantiate" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "g").exists()


def test_a_translator_checkpoint_is_not_loaded_as_a_sampler(tmp_path):
    cfg = {"_target_": "generators.translators.fixed_point.FixedPointGAN", "classes": ["Edema"], "image_size": 32}
    ckpt = _checkpoint(tmp_path / "fixed_point" / "checkpoint.pt", cfg)
    with pytest.raises(UserError, match="holds a translator .*not a sampler"):
        load_model(ckpt, kind="sampler")
