"""classifiers.model: builder, local pretrained weights, checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from classifiers import model as cm
from classifiers.model import create_classifier, load_classifier, load_pretrained, save_checkpoint


def _x(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", ["tiny", "test_resnet", "resnet18", "resnet50"])
def test_every_name_builds_one_channel_with_right_head(name: str) -> None:
    model = create_classifier(name, num_classes=3, in_chans=1).eval()
    first = dict(model.named_modules())[model.pretrained_cfg["first_conv"]]
    assert first.in_channels == 1
    assert model.get_classifier().out_features == 3
    with torch.no_grad():
        out = model(_x())
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


def test_tiny_is_small_and_fast() -> None:
    model = create_classifier("tiny", num_classes=2)
    assert cm.count_parameters(model) < 1_000_000
    assert cm.resolve_model_name("tiny") == "test_resnet"


def test_unknown_name_names_a_close_match() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        create_classifier("resnet5O", num_classes=2)


def test_pretrained_download_is_refused() -> None:
    with pytest.raises(ValueError, match="pretrained_path"):
        create_classifier("tiny", num_classes=2, pretrained=True)


def test_init_seed_reproducible_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = create_classifier("tiny", num_classes=2, init_seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = create_classifier("tiny", num_classes=2, init_seed=3)
    c = create_classifier("tiny", num_classes=2, init_seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc.weight"], sc["fc.weight"])


def test_pretrained_path_round_trip(tmp_path: Path) -> None:
    src = create_classifier("tiny", num_classes=3, init_seed=1)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    dst = create_classifier("tiny", num_classes=3, pretrained_path=str(path), init_seed=2)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    src.eval(), dst.eval()
    with torch.no_grad():
        assert torch.equal(src(_x()), dst(_x()))


def test_pretrained_head_mismatch_is_dropped_with_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = create_classifier("tiny", num_classes=1000, init_seed=1)
    path = tmp_path / "imagenet_like.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    with caplog.at_level(logging.INFO, logger="classifiers.model"):
        dst = create_classifier("tiny", num_classes=2, pretrained_path=path, init_seed=2)
    assert "dropping classifier head" in caplog.text
    assert dst.fc.out_features == 2
    assert torch.equal(dst.conv1[0].weight, src.conv1[0].weight)
    assert torch.equal(dst.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    fresh = create_classifier("tiny", num_classes=2, init_seed=2)
    assert torch.equal(dst.fc.weight, fresh.fc.weight)  # head kept its own initialisation


def test_pretrained_rgb_stem_is_adapted_to_one_channel(tmp_path: Path) -> None:
    rgb = create_classifier("tiny", num_classes=2, in_chans=3, init_seed=1)
    path = tmp_path / "rgb.pth"
    torch.save(rgb.state_dict(), path)
    gray = create_classifier("tiny", num_classes=2, in_chans=1, pretrained_path=path)
    expected = rgb.conv1[0].weight.sum(dim=1, keepdim=True)  # timm adapt_input_conv for 1 channel
    assert torch.allclose(gray.conv1[0].weight, expected)


def test_pretrained_missing_file_names_path_and_no_download(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError) as err:
        create_classifier("tiny", num_classes=2, pretrained_path=missing)
    assert str(missing) in str(err.value)
    assert "never downloads" in str(err.value)


def test_pretrained_other_architecture_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(create_classifier("resnet18", num_classes=2).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit|miss"):
        load_pretrained(create_classifier("tiny", num_classes=2), path)


def _save(tmp_path: Path, model: torch.nn.Module, name: str = "best.pt") -> Path:
    return save_checkpoint(
        tmp_path / "run" / name,
        model,
        model_cfg={"model_name": "tiny", "num_classes": 2, "in_chans": 1, "drop_rate": 0.1,
                   "pretrained_path": "/somewhere/else.pth"},
        classes=["Edema", "Hernia"],
        image_size=32,
        metrics={"val_mean_auc": np.float32(0.75), "val_auc": {"Edema": np.float64(0.5), "Hernia": None},
                 "curve": np.arange(3)},
        extra={"fingerprint": "abc"},
    )


def test_checkpoint_round_trip_identical_predictions(tmp_path: Path) -> None:
    model = create_classifier("tiny", num_classes=2, drop_rate=0.1, init_seed=5)
    # Give BatchNorm non-default running statistics so buffers are checked too.
    model.train()
    with torch.no_grad():
        model(_x(8, seed=1) * 0.5 + 0.3)
    model.eval()
    path = _save(tmp_path, model)
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]  # no temporary file left

    raw = torch.load(path, weights_only=True)
    assert raw["model_cfg"]["_target_"] == "classifiers.model.create_classifier"
    assert "pretrained_path" not in raw["model_cfg"]
    assert set(raw) >= {"model_cfg", "state_dict", "classes", "image_size", "metrics", "versions"}

    loaded, meta = load_classifier(path)
    assert not loaded.training
    assert meta["classes"] == ["Edema", "Hernia"] and meta["image_size"] == 32
    assert meta["metrics"]["val_mean_auc"] == pytest.approx(0.75)
    assert meta["metrics"]["curve"] == [0, 1, 2]
    assert meta["extra"] == {"fingerprint": "abc"}
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["timm"] == timm.__version__ and all(type(v) is str for v in meta["versions"].values())
    assert "state_dict" not in meta
    with torch.no_grad():
        assert torch.equal(model(_x(4)), loaded(_x(4)))


def test_checkpoint_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_classifier("tiny", num_classes=2, init_seed=5)
    path = _save(tmp_path, model)
    before = path.read_bytes()

    def broken_save(obj: object, f: Path) -> None:
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(cm.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, create_classifier("tiny", num_classes=2, init_seed=6))
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]


def test_checkpoint_rejects_foreign_target_and_wrong_class_count(tmp_path: Path) -> None:
    model = create_classifier("tiny", num_classes=2)
    with pytest.raises(ValueError, match="_target_"):
        save_checkpoint(tmp_path / "a.pt", model, model_cfg={"_target_": "os.system", "model_name": "tiny"},
                        classes=["A", "B"], image_size=32, metrics={})
    with pytest.raises(ValueError, match="3 classes"):
        save_checkpoint(tmp_path / "a.pt", model, model_cfg={"model_name": "tiny", "num_classes": 2},
                        classes=["A", "B", "C"], image_size=32, metrics={})
    with pytest.raises(TypeError, match="metrics"):
        save_checkpoint(tmp_path / "a.pt", model, model_cfg={"model_name": "tiny"},
                        classes=["A", "B"], image_size=32, metrics={"bad": object()})


def test_load_classifier_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_classifier(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model_cfg": {"_target_": "os.system", "command": "true"}, "state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="_target_"):
        load_classifier(foreign)
    bare = tmp_path / "bare.pt"
    torch.save(create_classifier("tiny", num_classes=2).state_dict(), bare)
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(bare)
    # Truncated file: a real checkpoint cut in half.
    good = _save(tmp_path, create_classifier("tiny", num_classes=2, drop_rate=0.1))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier(cut)


def test_checkpoint_usable_as_pretrained_path(tmp_path: Path) -> None:
    src = create_classifier("tiny", num_classes=2, drop_rate=0.1, init_seed=7)
    path = _save(tmp_path, src)
    dst = create_classifier("tiny", num_classes=5, pretrained_path=path)
    assert torch.equal(dst.conv1[0].weight, src.conv1[0].weight)


def test_library_imports_no_orchestration_packages() -> None:
    import subprocess
    import sys

    code = ("import sys, classifiers, classifiers.train, classifiers.evaluate, classifiers.model; "
            "bad = [m for m in ('augment', 'hydra', 'omegaconf', 'ray', 'optuna') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
