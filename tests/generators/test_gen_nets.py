"""DCGAN blocks and the shared adversarial losses (generators/nets.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from generators.nets import (
    DCGANDiscriminator,
    DCGANGenerator,
    discriminator_loss,
    frozen,
    generator_loss,
    gradient_penalty,
    num_resolution_blocks,
    randn,
)


@pytest.mark.parametrize("size,blocks", [(32, 3), (64, 4), (128, 5), (256, 6)])
def test_blocks_follow_image_size(size: int, blocks: int) -> None:
    assert num_resolution_blocks(size) == blocks


@pytest.mark.parametrize("size", [16, 48, 512, 100, 64.5])
def test_bad_image_size_is_refused(size) -> None:
    with pytest.raises(ValueError, match="power of two"):
        num_resolution_blocks(size)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_generator_and_discriminator_shapes(size: int) -> None:
    g = DCGANGenerator(image_size=size, z_dim=8, channels=4, num_classes=3)
    d = DCGANDiscriminator(image_size=size, channels=4, num_classes=3)
    z, y = torch.randn(2, 8), torch.eye(3)[:2]
    x = g(z, y)
    assert x.shape == (2, 1, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert d(x, y).shape == (2,)
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    downs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(ups) == len(downs) == num_resolution_blocks(size)


def test_width_multiplier_is_capped() -> None:
    g = DCGANGenerator(image_size=256, z_dim=4, channels=2, max_mult=4)
    widths = [m.out_channels for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    # 4x4 base: 2 * min(32, 4) = 8 channels, not 2 * 32; the last hidden block has `channels`.
    assert g.project[0].out_features == 8 * 16
    assert widths == [8, 8, 8, 4, 2, 1]


def test_conditional_nets_need_y_and_use_it() -> None:
    torch.manual_seed(0)
    g = DCGANGenerator(image_size=32, z_dim=8, channels=4, num_classes=3).eval()
    z = torch.randn(2, 8)
    with pytest.raises(ValueError, match="conditional"):
        g(z)
    assert not torch.allclose(g(z, torch.eye(3)[[0, 0]]), g(z, torch.eye(3)[[1, 1]]))
    for cond in ("projection", "concat"):
        d = DCGANDiscriminator(image_size=32, channels=4, num_classes=3, conditioning=cond).eval()
        x = torch.randn(2, 1, 32, 32)
        assert not torch.allclose(d(x, torch.eye(3)[[0, 0]]), d(x, torch.eye(3)[[2, 2]]))


def test_spectral_norm_bounds_the_layers() -> None:
    torch.manual_seed(0)
    d = DCGANDiscriminator(image_size=32, channels=4, spectral_norm=True, norm="none")
    x = torch.randn(4, 1, 32, 32)
    for _ in range(30):  # power iteration converges while training
        d(x)
    d.eval()
    w = d.head.weight
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, rel=1e-3)
    assert any("parametrizations" in k for k in d.state_dict())


def test_bce_losses_match_closed_form() -> None:
    zeros = torch.zeros(5)
    assert discriminator_loss("bce", zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert generator_loss("bce", zeros).item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -3.0])
    expect = -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert discriminator_loss("bce", real, fake).item() == pytest.approx(expect.item(), rel=1e-6)


def test_hinge_and_wgan_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    assert generator_loss("hinge", fake).item() == pytest.approx(1.0)
    assert discriminator_loss("wgan-gp", real, fake).item() == pytest.approx(-1.0 - 1.25)
    with pytest.raises(ValueError, match="bce, hinge, wgan-gp"):
        discriminator_loss("lsgan", real, fake)


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


def test_randn_is_reproducible_from_the_generator() -> None:
    a = randn((3, 4), generator=torch.Generator().manual_seed(1), device="cpu")
    b = randn((3, 4), generator=torch.Generator().manual_seed(1), device="cpu")
    c = randn((3, 4), generator=torch.Generator().manual_seed(2), device="cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_frozen_blocks_weight_gradients_but_not_input_gradients() -> None:
    lin = nn.Linear(3, 1)
    x = torch.randn(2, 3, requires_grad=True)
    with frozen(lin):
        out = lin(x).sum()
    out.backward()
    assert lin.weight.grad is None and x.grad is not None
    assert lin.weight.requires_grad
