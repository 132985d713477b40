"""UCGAN (generators/ucgan.py): the score losses against hand computations, G gradients, steps."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from gen_helpers import CLASSES, TinyClassifier, tiny_batch
from torch import nn

from generators.base import GANSystem, Sampler
from generators.ucgan import (
    UCGAN,
    classifier_loss,
    gaussian_kernel,
    gram_matrix,
    inception_score_loss,
    mmd_loss,
    pseudo_label_loss,
    pseudo_label_mask,
    style_loss,
)


def tiny_ucgan(classifier: nn.Module | None = None, **kw) -> UCGAN:
    return UCGAN(
        classes=CLASSES,
        classifier=classifier if classifier is not None else TinyClassifier(),
        image_size=32,
        z_dim=8,
        g_channels=4,
        d_channels=4,
        **kw,
    )


# -- Eq. 7 -------------------------------------------------------------------------------------------


def test_is_loss_matches_hand_computation() -> None:
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    marg = [0.7, 0.3]
    kl1 = 0.5 * math.log(0.5 / marg[0]) + 0.5 * math.log(0.5 / marg[1])
    kl2 = 0.9 * math.log(0.9 / marg[0]) + 0.1 * math.log(0.1 / marg[1])
    got = inception_score_loss(torch.log(p) + 1.7)  # logits: any shift per row gives the same softmax
    assert got.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-5)
    # Eq. 7's second form: H(marginal) - mean conditional entropy.
    h = lambda q: -sum(v * math.log(v) for v in q)  # noqa: E731
    assert got.item() == pytest.approx(h(marg) - (h([0.5, 0.5]) + h([0.9, 0.1])) / 2, rel=1e-5)


def test_is_loss_is_zero_for_identical_rows_and_max_for_confident_diverse_rows() -> None:
    same = torch.tensor([[0.3, -1.0, 2.0]]).repeat(5, 1)
    assert inception_score_loss(same).item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.eye(3) * 50.0  # one-hot predictions spread over all classes: log K
    assert inception_score_loss(confident).item() == pytest.approx(math.log(3), rel=1e-4)


# -- Eq. 8 -------------------------------------------------------------------------------------------


def _mmd_brute(x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    k = lambda a, b: math.exp(-float(((a - b) ** 2).sum()) / sigma**2)  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    if n == m:
        xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m) if i != j) / (n * (n - 1))
    else:
        xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("n,m,sigma", [(5, 5, 1.0), (4, 6, 0.5)])
def test_mmd_matches_brute_force(n: int, m: int, sigma: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(n, 3, generator=g), 1)
    y = torch.softmax(torch.randn(m, 3, generator=g) * 2, 1)
    assert mmd_loss(x, y, sigma).item() == pytest.approx(_mmd_brute(x, y, sigma), rel=1e-5, abs=1e-7)


def test_mmd_zero_for_identical_and_larger_for_shifted() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(256, 3, generator=g), 1)
    q = torch.softmax(torch.randn(256, 3, generator=g), 1)  # same distribution, other samples
    shifted = torch.softmax(torch.randn(256, 3, generator=g) + torch.tensor([4.0, 0, 0]), 1)
    assert mmd_loss(p, p).item() == pytest.approx(0.0, abs=1e-6)
    same, far = mmd_loss(p, q).item(), mmd_loss(p, shifted).item()
    assert abs(same) < 0.01 and far > 0.3 and far > 30 * abs(same)


def test_mmd_kernel_and_size_check() -> None:
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert gaussian_kernel(a, a)[0, 1].item() == pytest.approx(math.exp(-2.0))
    with pytest.raises(ValueError, match="at least 2"):
        mmd_loss(a[:1], a)


# -- Eq. 9 -------------------------------------------------------------------------------------------


def test_gram_matrix_by_hand() -> None:
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)  # C=2, H=1, W=2
    expect = torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / 4
    assert torch.allclose(gram_matrix(f)[0], expect)


def test_style_loss_by_hand() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 1, 2)
    b = torch.zeros(1, 2, 1, 2)
    # layer 1: ||G(a) - 0||_F^2 = (25 + 121 + 121 + 625) / 16; layer 2 identical features: 0.
    expect = (25 + 121 + 121 + 625) / 16
    assert style_loss([a, b], [b, b]).item() == pytest.approx(expect)
    assert style_loss([a], [a]).item() == 0.0
    # unpaired batches compare mean Gram matrices: [a, -a] has the same mean Gram as [a, a].
    assert style_loss([torch.cat([a, -a])], [torch.cat([a, a])]).item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        style_loss([a], [a, a])


# -- classifier and pseudo-labels ----------------------------------------------------------------


def test_classifier_loss_uses_normalised_multi_hot_and_skips_unlabelled() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [5.0, 5.0, 5.0]])
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    lp = torch.log_softmax(logits, 1)
    expect = (-(0.5 * lp[0, 0] + 0.5 * lp[0, 1]) - lp[1, 1]) / 2  # row 3 has no label
    assert classifier_loss(logits, y).item() == pytest.approx(expect.item(), rel=1e-6)
    assert classifier_loss(logits, torch.zeros(3, 3)).item() == 0.0


def test_pseudo_labels_respect_threshold() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    probs = torch.softmax(logits.detach(), 1)
    mask = pseudo_label_mask(logits, 0.75)
    assert mask.tolist() == [True, False, True]
    expect = (-torch.log(probs[0, 0]) - torch.log(probs[2, 2])) / 3
    loss = pseudo_label_loss(logits, 0.75)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert pseudo_label_loss(logits, 0.999).item() == 0.0


# -- the system ----------------------------------------------------------------------------------


def test_each_score_term_trains_g() -> None:
    """The reference code detaches G(z) before the scores; here every term must reach G's weights."""
    torch.manual_seed(0)
    m = tiny_ucgan(threshold=0.0)  # accept every pseudo-label so the CE term is non-empty
    batch = tiny_batch(b=6)
    fake = m.G(torch.randn(6, 8))
    terms = m.score_terms(batch["x"], fake)
    assert set(terms) == {"is", "mmd", "style", "pseudo"}
    for name, term in terms.items():
        m.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        grads = [p.grad for p in m.G.parameters() if p.grad is not None]
        assert grads, name
        assert sum(g.abs().sum().item() for g in grads) > 0, f"{name} gives G no gradient"


def test_score_terms_follow_the_flags() -> None:
    m = tiny_ucgan(use_is=False, use_mmd=True, use_style=False)
    terms = m.score_terms(tiny_batch()["x"], m.G(torch.randn(4, 8)))
    assert set(terms) == {"mmd", "pseudo"}


@pytest.mark.parametrize("use_is,use_mmd,use_style", list(itertools.product([False, True], repeat=3)))
def test_one_training_step_each_ablation(use_is: bool, use_mmd: bool, use_style: bool) -> None:
    torch.manual_seed(0)
    m = tiny_ucgan(use_is=use_is, use_mmd=use_mmd, use_style=use_style)
    assert isinstance(m, GANSystem) and isinstance(m, Sampler)
    opts = m.configure_optimizers()
    assert set(opts) == {"g", "d", "c"}
    assert all(o.param_groups[0]["weight_decay"] == 1e-3 for o in opts.values())
    c0 = [p.detach().clone() for p in m.C.parameters()]
    out = m.training_step(tiny_batch(), opts, step=0, generator=torch.Generator().manual_seed(0))
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert ("loss_is" in out) == use_is and ("loss_mmd" in out) == use_mmd and ("loss_style" in out) == use_style
    assert 0.0 <= out["acceptance"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(c0, m.C.parameters()))
    x = m.sample(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 32, 32)


def test_acceptance_and_classify() -> None:
    m = tiny_ucgan(threshold=0.0)
    out = m.training_step(tiny_batch(), m.configure_optimizers(), step=0, generator=torch.Generator().manual_seed(0))
    assert out["acceptance"] == 1.0 and out["loss_c_fake"] > 0
    p = m.classify(tiny_batch()["x"])
    assert p.shape == (4, 3) and torch.allclose(p.sum(1), torch.ones(4))


def test_wrong_classifier_width_is_reported() -> None:
    m = tiny_ucgan(classifier=TinyClassifier(num_classes=5))
    with pytest.raises(ValueError, match="B x 3 logits"):
        m.training_step(tiny_batch(), m.configure_optimizers(), step=0, generator=torch.Generator())


def test_timm_classifier_features_feed_the_style_loss() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    c = timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=3)
    m = tiny_ucgan(classifier=c)
    assert m._features.timm and m._features.layers == [0, 1, 2]
    fake = m.G(torch.randn(4, 8))
    terms = m.score_terms(tiny_batch()["x"], fake)
    terms["style"].backward()
    assert terms["style"].item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.G.parameters())
    # forward_intermediates + forward_head must give the same logits as the model itself
    x = tiny_batch()["x"]
    c.eval()
    assert torch.allclose(m._features(c, x, logits=True)[0], c(x), atol=1e-5)


def test_injected_feature_net_is_frozen_and_used() -> None:
    torch.manual_seed(0)
    feat = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 5, 3, stride=2), nn.BatchNorm2d(5))
    m = tiny_ucgan(feature_net=feat, style_layers=["0", "2"])
    m.train()
    assert not feat.training and not any(p.requires_grad for p in feat.parameters())
    fake = m.G(torch.randn(4, 8))
    terms = m.score_terms(tiny_batch()["x"], fake)
    terms["style"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.G.parameters())
    assert all(p.grad is None for p in feat.parameters())
    assert all(p.grad is None for p in m.C.parameters())  # C gave no style features here
    with pytest.raises(ValueError, match="not found"):
        tiny_ucgan(feature_net=feat, style_layers=["nope"])
