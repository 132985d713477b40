"""The adversarial toolkit (generators/adversarial.py): losses on hand-made logits, penalties on linear
critics, noise draws, ``frozen``, and the ``discriminate`` seam that every family's D calls pass."""

from __future__ import annotations

import math

import pytest
import torch
from gen_helpers import CLASSES, TinyClassifier, tiny_batch
from torch import nn

import generators.cgan
import generators.translators.branched
import generators.translators.fixed_point
import generators.translators.taggan
import generators.ucgan
from generators import adversarial
from generators.adversarial import (
    KINDS,
    check_kind,
    d_loss,
    frozen,
    g_loss,
    gradient_penalty,
    r1_penalty,
    rand,
    randn,
    randperm,
)

# -- losses -------------------------------------------------------------------------------------------


def test_bce_losses_match_closed_form() -> None:
    zeros = torch.zeros(5)
    assert d_loss("bce", zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert g_loss("bce", zeros).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    expect = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert d_loss("bce", real, fake).item() == pytest.approx(expect.item(), rel=1e-6)


def test_hinge_wgan_and_lsgan_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert d_loss("hinge", real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert g_loss("hinge", fake).item() == pytest.approx(1.0)
    assert d_loss("wgan", real, fake).item() == pytest.approx(-1.0 - 1.25)
    assert g_loss("wgan", torch.tensor([2.0, 4.0])).item() == pytest.approx(-3.0)
    zero, one = torch.zeros(3), torch.ones(3)
    assert d_loss("lsgan", one, zero).item() == pytest.approx(0.0)
    assert d_loss("lsgan", zero, one).item() == pytest.approx(1.0)  # 0.5 * (1 + 1)
    assert g_loss("lsgan", one).item() == pytest.approx(0.0)
    assert g_loss("lsgan", zero).item() == pytest.approx(0.5)


def test_wgan_gp_is_the_cgan_spelling_of_wgan() -> None:
    real, fake = torch.randn(4), torch.randn(4)
    assert check_kind("wgan-gp") == "wgan"
    assert torch.equal(d_loss("wgan-gp", real, fake), d_loss("wgan", real, fake))
    assert torch.equal(g_loss("wgan-gp", fake), g_loss("wgan", fake))


def test_unknown_kind_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'nope'.*bce, hinge, lsgan, wgan, wgan-gp"):
        d_loss("nope", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        g_loss("nope", torch.zeros(1))


def test_fake_sets_are_averaged_so_real_and_fake_weigh_the_same() -> None:
    real = torch.tensor([1.0, 3.0])
    fakes = [torch.tensor([0.0]), torch.tensor([2.0])]
    assert d_loss("wgan", real, fakes).item() == pytest.approx(1.0 - 2.0)
    zero = torch.zeros(3)
    assert d_loss("bce", zero, [zero, zero]).item() == pytest.approx(2 * math.log(2))
    for kind in KINDS:  # one set given twice is that set
        r, f = torch.randn(5), torch.randn(5)
        assert d_loss(kind, r, [f, f]).item() == pytest.approx(d_loss(kind, r, f).item(), rel=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        d_loss("bce", real, [])


def test_patch_logits_are_averaged() -> None:
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -1.0)
    assert d_loss("wgan", real, [fake]).item() == pytest.approx(-3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_upcast_reduces_low_precision_logits_in_float32(kind: str) -> None:
    real, fake = torch.randn(8).bfloat16(), torch.randn(8).bfloat16()
    assert d_loss(kind, real, fake).dtype == torch.float32
    assert g_loss(kind, fake).dtype == torch.float32
    kept = d_loss(kind, real, [fake], upcast=False)  # the translators' reductions keep the logits' dtype
    assert kept.dtype == torch.bfloat16
    # on float32 logits the two agree exactly
    r, f = real.float(), fake.float()
    assert torch.equal(d_loss(kind, r, f), d_loss(kind, r, f, upcast=False))


def test_losses_train_d_in_the_right_direction() -> None:
    for kind in KINDS:
        real = torch.zeros(4, requires_grad=True)
        fake = torch.zeros(4, requires_grad=True)
        d_loss(kind, real, fake).backward()
        assert (real.grad <= 0).all() and (fake.grad >= 0).all() and real.grad.sum() < 0, kind
        fake_g = torch.zeros(4, requires_grad=True)
        g_loss(kind, fake_g).backward()
        assert (fake_g.grad < 0).all(), kind  # G raises D's score on its images


# -- penalties ----------------------------------------------------------------------------------------


def test_gradient_penalty_of_a_linear_critic() -> None:
    # D(x) = <w, x>: the gradient is w everywhere, so the penalty is (||w|| - 1)^2 exactly.
    lin = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0, 4.0, 0, 0, 0]]))
    critic = lambda x: lin(x.flatten(1)).squeeze(1)  # noqa: E731
    real, fake = torch.randn(4, 1, 2, 3), torch.randn(4, 1, 2, 3)
    gp = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(0))
    assert gp.item() == pytest.approx(16.0)
    gp.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_gradient_penalty_on_patch_critics_and_r1() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.zeros(1, 1, 4, 4)
    w[0, 0, 0, 0] = 1.0  # ||grad|| = 1 everywhere -> penalty 0
    real, fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    assert gradient_penalty(lambda z: z * w, real, fake, generator=g).item() == pytest.approx(0.0)
    steep = gradient_penalty(lambda z: (3 * z * w).flatten(1).sum(1), real, fake, generator=g)
    assert steep.item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="differ"):
        gradient_penalty(lambda z: z, real, fake[:2], generator=g)
    xr = real.clone().requires_grad_(True)
    assert r1_penalty((2 * xr * w).flatten(1).sum(1), xr).item() == pytest.approx(0.5 * 4.0)


def test_gradient_penalty_draws_its_weights_from_the_generator() -> None:
    real, fake = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    critic = lambda z: (z**2).flatten(1).sum(1)  # noqa: E731  (a gradient that depends on the interpolate)
    a = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(1))
    b = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(1))
    c = gradient_penalty(critic, real, fake, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- noise and gradients ------------------------------------------------------------------------------


def test_draws_are_reproducible_from_the_generator_and_moved() -> None:
    for draw in (randn, rand):
        a = draw((3, 4), generator=torch.Generator().manual_seed(1), device="cpu")
        b = draw((3, 4), generator=torch.Generator().manual_seed(1), device="cpu")
        c = draw((3, 4), generator=torch.Generator().manual_seed(2), device="cpu")
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert draw((2,), generator=torch.Generator(), device="cpu", dtype=torch.float64).dtype == torch.float64
    u = rand((1000,), generator=torch.Generator().manual_seed(0), device="cpu")
    assert 0.0 <= u.min() and u.max() < 1.0
    p = randperm(6, generator=torch.Generator().manual_seed(0), device="cpu")
    assert sorted(p.tolist()) == list(range(6))


def test_frozen_blocks_weight_gradients_but_not_input_gradients() -> None:
    lin, other = nn.Linear(3, 1), nn.Linear(1, 1)
    other.bias.requires_grad_(False)  # a flag set before the block is restored as it was
    x = torch.randn(2, 3, requires_grad=True)
    with frozen(lin, other):
        out = other(lin(x)).sum()
    out.backward()
    assert lin.weight.grad is None and x.grad is not None
    assert lin.weight.requires_grad and other.weight.requires_grad and not other.bias.requires_grad


# -- the seam -----------------------------------------------------------------------------------------

TINY_T = {"g_width": 4, "d_width": 4, "n_res": 1, "n_down": 2}
FINDINGS = ["Edema", "Mass"]


def _family(name: str) -> tuple[nn.Module, list[nn.Module], dict]:
    """A tiny system, its discriminators and a batch."""
    from generators.translators import BranchedGAN, FixedPointGAN, TagGAN

    torch.manual_seed(0)
    x, y2 = tiny_batch()["x"], torch.tensor([[1.0, 0], [0, 0], [0, 1], [0, 0]])
    if name == "cgan":
        m = generators.cgan.CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4, loss="wgan-gp")
        return m, [m.D], tiny_batch()
    if name == "ucgan":
        m = generators.ucgan.UCGAN(classes=CLASSES, classifier=TinyClassifier(), image_size=32, z_dim=8,
                                   g_channels=4, d_channels=4)
        return m, [m.D], tiny_batch()
    if name == "fixed_point":
        m = FixedPointGAN(classes=FINDINGS, image_size=32, **TINY_T)
        return m, [m.D], {"x": x, "y": y2}
    if name == "taggan":
        m = TagGAN(classes=FINDINGS, image_size=32, adv="wgan", lambda_gp=1.0, **TINY_T)
        return m, [m.D_normal, m.D_abnormal], {"x": x, "y": y2}
    m = BranchedGAN(classes=FINDINGS, image_size=32, n_branches=2, **TINY_T)
    return m, [m.D], {"x": x, "y": y2}


MODULES = {
    "cgan": generators.cgan,
    "ucgan": generators.ucgan,
    "fixed_point": generators.translators.fixed_point,
    "taggan": generators.translators.taggan,
    "branched": generators.translators.branched,
}


@pytest.mark.parametrize("family", list(MODULES))
def test_every_discriminator_call_passes_through_discriminate(family: str, monkeypatch) -> None:
    system, discriminators, batch = _family(family)
    seam_calls, d_calls = [0], [0]

    def counting(D, x, *cond, **kw):
        seam_calls[0] += 1
        return adversarial.discriminate(D, x, *cond, **kw)

    monkeypatch.setattr(MODULES[family], "discriminate", counting)
    for d in discriminators:
        d.register_forward_hook(lambda *_: d_calls.__setitem__(0, d_calls[0] + 1))
    system.training_step(batch, system.configure_optimizers(), step=0, generator=torch.Generator().manual_seed(0))
    assert d_calls[0] > 0 and seam_calls[0] == d_calls[0]
