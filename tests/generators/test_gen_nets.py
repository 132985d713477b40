"""DCGAN blocks (generators/nets.py); their losses are tested in test_adversarial.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from generators.nets import DCGANDiscriminator, DCGANGenerator, num_resolution_blocks


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
