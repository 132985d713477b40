"""CGAN system (generators/cgan.py): one step per loss, sampling, resolution sweep."""

from __future__ import annotations

import math

import pytest
import torch
from gen_helpers import CLASSES, tiny_batch

from generators.base import GANSystem, Sampler
from generators.cgan import CGAN


def tiny_cgan(**kw) -> CGAN:
    return CGAN(classes=CLASSES, image_size=kw.pop("image_size", 32), z_dim=8, g_channels=4, d_channels=4, **kw)


def _params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize(
    "kw",
    [
        {"loss": "bce"},
        {"loss": "hinge"},
        {"loss": "wgan-gp"},
        {"loss": "lsgan"},
        {"loss": "hinge", "spectral_norm": True},
        {"loss": "bce", "d_conditioning": "concat"},
    ],
    ids=["bce", "hinge", "wgan-gp", "lsgan", "hinge-sn", "bce-concat"],
)
def test_one_training_step(kw: dict) -> None:
    torch.manual_seed(0)
    m = tiny_cgan(**kw)
    assert isinstance(m, GANSystem) and isinstance(m, Sampler)
    opts = m.configure_optimizers()
    g0, d0 = _params(m.G), _params(m.D)
    out = m.training_step(tiny_batch(), opts, step=0, generator=torch.Generator().manual_seed(0))
    assert {"loss_d", "loss_g", "d_real", "d_fake"} <= set(out)
    assert ("gp" in out) == (kw["loss"] == "wgan-gp")
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(g0, m.G.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, m.D.parameters()))
    x = m.sample(5, torch.eye(3)[[0, 1, 2, 0, 1]], generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 32, 32) and torch.isfinite(x).all()


def test_unknown_loss_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"'lsgn'.*bce, hinge, lsgan, wgan, wgan-gp"):
        tiny_cgan(loss="lsgn")


def test_wgan_is_another_spelling_of_wgan_gp() -> None:
    states = []
    for loss in ("wgan-gp", "wgan"):
        torch.manual_seed(0)
        m = tiny_cgan(loss=loss)
        g = torch.Generator().manual_seed(0)
        out = m.training_step(tiny_batch(), m.configure_optimizers(), step=0, generator=g)
        assert "gp" in out
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_wgan_gp_discriminator_has_no_batch_norm() -> None:
    m = tiny_cgan(loss="wgan-gp")
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in m.D.modules())
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in tiny_cgan(loss="bce").D.modules())


def test_n_critic_updates_d_more_often() -> None:
    m = tiny_cgan(loss="wgan-gp", n_critic=3)
    opts = m.configure_optimizers()
    m.training_step(tiny_batch(), opts, step=0, generator=torch.Generator().manual_seed(0))
    d_steps = {int(s["step"]) for s in opts["d"].state.values()}
    g_steps = {int(s["step"]) for s in opts["g"].state.values()}
    assert d_steps == {3} and g_steps == {1}


@pytest.mark.parametrize("size", [32, 64, 128])
def test_resolution_sweep(size: int) -> None:
    m = tiny_cgan(image_size=size).eval()
    x = m.sample(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, size, size)
    assert m.D(x, torch.eye(3)[:2]).shape == (2,)


def test_sampling_is_reproducible_and_conditional() -> None:
    torch.manual_seed(0)
    m = tiny_cgan().eval()
    a = m.sample(4, generator=torch.Generator().manual_seed(3))
    b = m.sample(4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    y0, y1 = torch.eye(3)[[0] * 4], torch.eye(3)[[1] * 4]
    s0 = m.sample(4, y0, generator=torch.Generator().manual_seed(3))
    s1 = m.sample(4, y1, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(s0, s1)
    with pytest.raises(ValueError, match="4 x 3"):
        m.sample(4, torch.eye(2)[[0, 1, 0, 1]], generator=torch.Generator())
