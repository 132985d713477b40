"""classifiers.train: masked BCE, schedule, sampling, the loop on a tiny separable problem."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from classifiers.evaluate import evaluate, predict
from classifiers.model import create_classifier, load_classifier
from classifiers.train import (
    TrainResult,
    cosine_with_warmup,
    masked_bce_with_logits,
    train_classifier,
)

nan = float("nan")


def test_masked_bce_nan_label_gives_no_loss_and_no_gradient() -> None:
    logits = torch.tensor([[2.0, 1e4], [-1.0, 0.5]], requires_grad=True)  # huge logit under the NaN
    targets = torch.tensor([[1.0, nan], [0.0, 1.0]])
    loss = masked_bce_with_logits(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[0, 1] == 0
    assert (logits.grad[[0, 1, 1], [0, 0, 1]] != 0).all()
    bce = nn.functional.binary_cross_entropy_with_logits
    expected = (bce(torch.tensor(2.0), torch.tensor(1.0)) + bce(torch.tensor(-1.0), torch.tensor(0.0))
                + bce(torch.tensor(0.5), torch.tensor(1.0))) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_masked_bce_all_nan_is_zero_without_nan_gradient() -> None:
    logits = torch.randn(3, 2, requires_grad=True)
    loss = masked_bce_with_logits(logits, torch.full((3, 2), nan))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros(3, 2))


def test_weight_zero_sample_changes_nothing_and_weights_scale() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g)
    targets = (torch.rand(4, 3, generator=g) > 0.5).float()
    extra_logits, extra_targets = torch.randn(2, 3, generator=g), torch.ones(2, 3)
    base = masked_bce_with_logits(logits, targets)
    mixed = masked_bce_with_logits(torch.cat([logits, extra_logits]), torch.cat([targets, extra_targets]),
                                   torch.tensor([1.0, 1, 1, 1, 0, 0]))
    assert mixed.item() == pytest.approx(base.item(), rel=1e-6)
    heavier = masked_bce_with_logits(torch.cat([logits, extra_logits]), torch.cat([targets, extra_targets]),
                                     torch.tensor([1.0, 1, 1, 1, 2, 2]))
    per_extra = nn.functional.binary_cross_entropy_with_logits(extra_logits, extra_targets)
    expected = (base * 12 + per_extra * 2 * 6) / (12 + 12)
    assert heavier.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cosine_with_warmup_shape() -> None:
    f = cosine_with_warmup(total_steps=100, warmup_steps=10)
    ramp = [f(s) for s in range(10)]
    assert ramp == sorted(ramp) and ramp[0] == pytest.approx(0.1) and ramp[-1] == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6)
    assert f(99) < 0.01
    tail = [f(s) for s in range(10, 100)]
    assert tail == sorted(tail, reverse=True)


def _tiny(seed: int = 0, drop_rate: float = 0.0) -> nn.Module:
    return create_classifier("tiny", num_classes=2, init_seed=seed, drop_rate=drop_rate)


def test_trains_to_high_auc_on_separable_problem(squares, tmp_path: Path) -> None:
    train, val = squares(256, seed=1), squares(128, seed=2)
    model = _tiny()
    seen: list[tuple[int, dict]] = []
    ckpt = tmp_path / "best.pt"
    result = train_classifier(
        model, train, val, epochs=4, batch_size=32, lr=3e-3, seed=0, progress=False,
        ckpt_path=ckpt, ckpt_meta={"model_cfg": {"model_name": "tiny", "num_classes": 2}},
        on_epoch=lambda e, m: seen.append((e, m)),
    )
    assert isinstance(result, TrainResult)
    assert result.best_val_auc is not None and result.best_val_auc > 0.9, result.history
    assert [e for e, _ in seen] == [r["epoch"] for r in result.history] == list(range(1, 5))
    assert all(set(m) >= {"train_loss", "val_mean_auc", "val_auc", "lr"} for _, m in seen)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.train_seconds > 0 and result.images_per_second > 0
    # The model holds the best epoch's weights.
    pred = predict(model, val)
    assert evaluate(pred.probs, pred.labels, val.classes)["mean_auc"] == pytest.approx(result.best_val_auc, abs=1e-6)
    # And the checkpoint is that epoch, rebuilt from its own config: identical predictions.
    loaded, meta = load_classifier(ckpt)
    assert meta["metrics"]["epoch"] == result.best_epoch
    assert meta["classes"] == ["Square", "Bar"] and meta["image_size"] == 32
    np.testing.assert_array_equal(predict(loaded, val).probs, pred.probs)


def test_same_seed_same_weights_different_seed_differs(squares) -> None:
    train, val = squares(64, seed=1), squares(32, seed=2)

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = _tiny(seed=0, drop_rate=0.2)  # dropout: in-training randomness must be seeded too
        train_classifier(model, train, val, epochs=2, batch_size=16, seed=seed, progress=False)
        return model.state_dict()

    state = torch.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


class _MeanBrightness(nn.Module):
    """No BatchNorm, no randomness: logit = w * mean(x) + b for both classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.fill_(5.0)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(1, 2, 3)).unsqueeze(1))


def test_early_stopping_keeps_best_weights_and_callback_can_stop(squares, tmp_path: Path) -> None:
    train, val = squares(64, seed=1, p_square=0.5), squares(64, seed=2)
    model = _MeanBrightness()
    best_weight = model.fc.weight.detach().clone()

    def spoil(epoch: int, metrics: dict) -> None:
        if epoch == 1:  # flip the sign: every later epoch ranks images backwards
            with torch.no_grad():
                model.fc.weight.neg_()

    # lr=0: the weights change only through the callback, so the best epoch is exactly 1.
    result = train_classifier(model, train, val, epochs=10, batch_size=16, lr=0.0, patience=2,
                              on_epoch=spoil, progress=False)
    assert result.best_epoch == 1
    assert len(result.history) == 3  # epochs 2 and 3 were not better: stop
    assert result.history[1]["val_mean_auc"] < result.history[0]["val_mean_auc"]
    assert torch.equal(model.fc.weight, best_weight)

    class Pruned(Exception):
        pass

    def prune(epoch: int, metrics: dict) -> None:
        spoil(epoch, metrics)
        if epoch == 2:
            raise Pruned

    model2 = _MeanBrightness()
    with pytest.raises(Pruned):
        train_classifier(model2, train, val, epochs=10, batch_size=16, lr=0.0, on_epoch=prune, progress=False)
    assert torch.equal(model2.fc.weight, best_weight)  # best weights restored even when stopped early


def test_nan_labels_are_trained_around(squares) -> None:
    train, val = squares(128, seed=1, nan_frac=0.3), squares(64, seed=2, nan_frac=0.3)
    result = train_classifier(_tiny(), train, val, epochs=2, batch_size=32, lr=3e-3, progress=False)
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert result.best_val_auc is not None


def test_balanced_sampling_draws_rare_class_more(squares) -> None:
    plain = squares(200, seed=1, p_square=0.1)
    rare = float(np.nansum(plain.labels[:, 0])) / len(plain)
    train_classifier(_tiny(), plain, None, epochs=1, batch_size=50, progress=False)
    drawn_plain = plain.labels[plain.accessed, 0].mean()
    balanced = squares(200, seed=1, p_square=0.1)
    result = train_classifier(_tiny(), balanced, None, epochs=1, batch_size=50, balanced=True, progress=False)
    drawn_balanced = balanced.labels[balanced.accessed, 0].mean()
    assert drawn_plain == pytest.approx(rare, abs=0.01)
    assert drawn_balanced > 2 * rare
    assert result.best_val_auc is None and result.best_epoch == 1


def test_external_batch_sampler_is_used(squares) -> None:
    ds = squares(40, seed=1)
    batches = [[0, 1, 2, 3], [10, 11, 12, 13], [20, 21, 22, 23]]
    result = train_classifier(_tiny(), ds, None, epochs=2, batch_size=999, sampler=batches, progress=False)
    assert ds.accessed == [i for b in batches for i in b] * 2
    assert len(result.history) == 2
    with pytest.raises(ValueError, match="exclude"):
        train_classifier(_tiny(), ds, None, epochs=1, batch_size=4, sampler=batches, balanced=True)


def test_argument_errors(squares, tmp_path: Path) -> None:
    ds = squares(8, seed=1)
    with pytest.raises(ValueError, match="model_cfg"):
        train_classifier(_tiny(), ds, ds, epochs=1, batch_size=4, ckpt_path=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(_tiny(), ds, ds, epochs=0, batch_size=4)


def test_divergence_is_reported(squares) -> None:
    ds = squares(32, seed=1)
    with pytest.raises(FloatingPointError, match="lower lr"):
        train_classifier(_MeanBrightness(), ds, None, epochs=1, batch_size=16, lr=float("inf"),
                         warmup_frac=0.0, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_amp_channels_last_path(squares, tmp_path: Path) -> None:
    train, val = squares(256, seed=1), squares(128, seed=2)
    model = _tiny()
    result = train_classifier(model, train, val, epochs=4, batch_size=32, lr=3e-3, device="cuda",
                              progress=False, ckpt_path=tmp_path / "best.pt",
                              ckpt_meta={"model_cfg": {"model_name": "tiny", "num_classes": 2}})
    assert result.best_val_auc > 0.9
    pred = predict(model, val, device="cuda")
    assert pred.probs.dtype == np.float32 and np.isfinite(pred.probs).all()
    loaded, _ = load_classifier(tmp_path / "best.pt")
    assert next(loaded.parameters()).device.type == "cpu"


def test_device_is_resolved_by_cxrbase(squares, monkeypatch) -> None:
    from cxrbase import DeviceError

    ds = squares(8, seed=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="device=auto or cpu"):
        train_classifier(_tiny(), ds, None, epochs=1, batch_size=4, device="cuda", progress=False)
    with pytest.raises(DeviceError, match="device=auto or cpu"):
        predict(_tiny(), ds, device="cuda:0")
    assert predict(_tiny(), ds, device="auto", return_features=False).probs.shape == (8, 2)


def test_batch_order_is_pinned_to_the_loader_generator(squares) -> None:
    # Each epoch makes and drops one loader iterator before iterating (the loop used to wrap the loader
    # in tqdm.auto, which does that): it draws one base seed from the generator, and earlier results
    # depend on it. This pins the draw so that a change to the progress bar cannot move the batches.
    from torch.utils.data import DataLoader

    ds = squares(40, seed=1)
    train_classifier(_tiny(), ds, None, epochs=2, batch_size=8, seed=5, progress=False)
    gen = torch.Generator().manual_seed(5)
    loader = DataLoader(list(range(40)), batch_size=8, shuffle=True, drop_last=True, generator=gen)
    expected: list[int] = []
    for _ in range(2):
        iter(loader)
        expected += [i for b in loader for i in b.tolist()]
    assert ds.accessed == expected
