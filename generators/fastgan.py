"""A lightweight FastGAN-style generator/discriminator pair (Liu et al. 2021), class-conditional.

Written from the paper's description (no code copied).  Conventions: ``x`` images float in [-1, 1],
B x 1 x H x W; ``y`` multi-hot float B x C; ``z`` noise B x z_dim; sizes powers of two in [32, 256].

Generator: ``[z, E y]`` -> 4 x 4 (transposed conv, BN, GLU), then one up-sampling block per doubling
(nearest x2, 3 x 3 conv, BN, GLU), a 3 x 3 conv and tanh.  **Skip-layer excitation** (SLE): a
low-resolution feature map gates the channels of a map ``ratio`` times larger,
``f_high * sigmoid(conv1x1(SiLU(conv4x4(avgpool_4(f_low)))))``; pairs ``(r, 16 r)`` from 8 px as in
the paper when the image is at least 128 px, ``(r, 8 r)`` from 4 px below that (64 px: 4 -> 32 and
8 -> 64).

Discriminator: strided 4 x 4 conv blocks (BN, LeakyReLU 0.2; spectral norm optional) down to 8 x 8,
a 4 x 4 conv giving a 5 x 5 logit map (averaged) plus a projection term ``<E y, pooled features>``.
**Self-supervised decoders**: on real images, a small decoder reconstructs the whole image (at up to
64 px) from the 8 x 8 features, and another reconstructs one quadrant from the matching quadrant of the
16 x 16 features (FastGAN's random crop); the loss is L1 (no pretrained perceptual network is
available), returned by ``forward(..., quadrant=q)`` for D's optimiser to add.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

from generators.nets import init_dcgan_weights, num_resolution_blocks


def sle_pairs(image_size: int) -> list[tuple[int, int]]:
    """The (low, high) resolutions joined by skip-layer excitation at ``image_size``."""
    ratio, low = (16, 8) if image_size >= 128 else (8, 4)
    pairs = []
    while low * ratio <= image_size:
        pairs.append((low, low * ratio))
        low *= 2
    return pairs


class SkipLayerExcitation(nn.Module):
    """Channel gates for a high-resolution map computed from a low-resolution one (FastGAN's SLE)."""

    def __init__(self, c_low: int, c_high: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.AdaptiveAvgPool2d(4),
            nn.Conv2d(c_low, c_high, 4, 1, 0, bias=False),
            nn.SiLU(),
            nn.Conv2d(c_high, c_high, 1, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        """``high`` with its channels scaled by gates in (0, 1) computed from ``low``."""
        return high * self.net(low)


def _up_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(c_in, 2 * c_out, 3, 1, 1, bias=False),
        nn.BatchNorm2d(2 * c_out),
        nn.GLU(dim=1),
    )


def _widths(image_size: int, channels: int, max_mult: int) -> dict[int, int]:
    """Channels per resolution: ``channels * min(size / res, max_mult)`` (wide at 4 px, thin at the output)."""
    n = num_resolution_blocks(image_size)
    return {4 * 2**k: channels * min(2 ** (n - k), max_mult) for k in range(n + 1)}


class FastGANGenerator(nn.Module):
    """Class-conditional FastGAN-style generator with skip-layer excitation.

    Args:
        image_size: output side, power of two in [32, 256].
        z_dim: noise dimension.
        channels: width at the output resolution (the 4 x 4 map has ``channels * max_mult``).
        max_mult: cap on the width multiplier.
        num_classes: size of the multi-hot ``y``; 0 makes the generator unconditional.
        out_channels: image channels.
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        z_dim: int = 128,
        channels: int = 16,
        max_mult: int = 8,
        num_classes: int = 0,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        num_resolution_blocks(image_size)
        self.image_size, self.z_dim, self.num_classes = image_size, z_dim, num_classes
        w = _widths(image_size, channels, max_mult)
        self.embed = nn.Linear(num_classes, z_dim) if num_classes > 0 else None
        in_dim = z_dim * (2 if self.embed is not None else 1)
        self.init = nn.Sequential(
            nn.Unflatten(1, (in_dim, 1, 1)),
            nn.ConvTranspose2d(in_dim, 2 * w[4], 4, 1, 0, bias=False),
            nn.BatchNorm2d(2 * w[4]),
            nn.GLU(dim=1),
        )
        self.res = [r for r in sorted(w) if r > 4]
        self.ups = nn.ModuleDict({str(r): _up_block(w[r // 2], w[r]) for r in self.res})
        self.pairs = sle_pairs(image_size)
        self.sle = nn.ModuleDict({f"{lo}_{hi}": SkipLayerExcitation(w[lo], w[hi]) for lo, hi in self.pairs})
        self.to_img = nn.Sequential(nn.Conv2d(w[image_size], out_channels, 3, 1, 1), nn.Tanh())
        init_dcgan_weights(self)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Images B x out_channels x image_size x image_size in [-1, 1] for noise ``z`` (and classes ``y``)."""
        if self.embed is not None:
            if y is None:
                raise ValueError("this generator is conditional: pass y (B x num_classes)")
            z = torch.cat([z, self.embed(y.to(z.dtype))], dim=1)
        feats = {4: self.init(z)}
        h = feats[4]
        for r in self.res:
            h = self.ups[str(r)](h)
            for lo, hi in self.pairs:
                if hi == r:
                    h = self.sle[f"{lo}_{hi}"](feats[lo], h)
            feats[r] = h
        return self.to_img(h)


class _Decoder(nn.Module):
    """8 x 8 features -> a 1-channel image of side ``8 * 2**n_up`` in [-1, 1] (FastGAN's simple decoder)."""

    def __init__(self, c_in: int, width: int, n_up: int, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = c_in
        for _ in range(n_up):
            layers.append(_up_block(c, width))
            c = width
        layers += [nn.Conv2d(c, out_channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class FastGANDiscriminator(nn.Module):
    """FastGAN-style discriminator with projection conditioning and self-supervised decoders.

    Args:
        image_size: input side, power of two in [32, 256].
        channels: width of the first block, doubled per block up to ``channels * max_mult``.
        max_mult: cap on the width multiplier.
        num_classes: size of ``y`` (projection conditioning); 0 makes it unconditional.
        norm: ``"batch"`` (FastGAN) or ``"none"`` (use with WGAN-GP).
        spectral_norm: spectral norm on every conv/linear of the critic path (FastGAN uses it).
        decoder_channels: width of the reconstruction decoders.
        in_channels: image channels.
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        channels: int = 16,
        max_mult: int = 8,
        num_classes: int = 0,
        norm: str = "batch",
        spectral_norm: bool = True,
        decoder_channels: int = 16,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        n = num_resolution_blocks(image_size) - 1  # down to 8 x 8
        self.image_size, self.num_classes = image_size, num_classes

        def sn(m: nn.Module) -> nn.Module:
            init_dcgan_weights(m)
            return _sn(m) if spectral_norm else m

        widths = [channels * min(2**k, max_mult) for k in range(n)]
        self.blocks = nn.ModuleList()
        c_in = in_channels
        for k, w in enumerate(widths):
            layers: list[nn.Module] = [sn(nn.Conv2d(c_in, w, 4, 2, 1, bias=norm == "none" or k == 0))]
            if norm == "batch" and k > 0:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            self.blocks.append(nn.Sequential(*layers))
            c_in = w
        self.c16, self.c8 = widths[-2], widths[-1]
        self.head = sn(nn.Conv2d(self.c8, 1, 4, 1, 0))  # 8 x 8 -> 5 x 5 logits
        self.embed = sn(nn.Linear(num_classes, self.c8, bias=False)) if num_classes > 0 else None
        self.rec_size = min(image_size, 64)
        n_up = num_resolution_blocks(self.rec_size) - 1
        self.dec_whole = _Decoder(self.c8, decoder_channels, n_up, in_channels)
        self.dec_part = _Decoder(self.c16, decoder_channels, n_up, in_channels)
        for dec in (self.dec_whole, self.dec_part):
            init_dcgan_weights(dec)

    def forward(
        self, x: Tensor, y: Tensor | None = None, *, quadrant: int | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits of shape B; with ``quadrant`` in 0..3 also the L1 reconstruction loss (scalar).

        The reconstruction targets are ``x`` itself (the images D was shown, augmented or not),
        area-downsampled to ``rec_size``: the whole image, and quadrant ``quadrant`` (0 top-left,
        1 top-right, 2 bottom-left, 3 bottom-right) at the same size.
        """
        if self.num_classes > 0 and y is None:
            raise ValueError("this discriminator is conditional: pass y (B x num_classes)")
        h = x
        f16 = None
        for blk in self.blocks:
            h = blk(h)
            if h.shape[-1] == 16:
                f16 = h
        logits = self.head(h).mean(dim=(1, 2, 3))
        if self.embed is not None:
            logits = logits + (self.embed(y.to(h.dtype)) * h.mean(dim=(2, 3))).sum(dim=1)
        if quadrant is None:
            return logits
        if not 0 <= int(quadrant) <= 3:
            raise ValueError(f"quadrant must be in 0..3, got {quadrant}")
        qy, qx = divmod(int(quadrant), 2)
        s = self.rec_size
        whole = F.interpolate(x, size=(s, s), mode="area") if x.shape[-1] != s else x
        half = x.shape[-1] // 2
        part = x[..., qy * half : (qy + 1) * half, qx * half : (qx + 1) * half]
        part = F.interpolate(part, size=(s, s), mode="area") if part.shape[-1] != s else part
        f16_part = f16[..., qy * 8 : (qy + 1) * 8, qx * 8 : (qx + 1) * 8]
        rec = (self.dec_whole(h) - whole).abs().mean() + (self.dec_part(f16_part) - part).abs().mean()
        return logits, rec.float()


__all__ = ["FastGANDiscriminator", "FastGANGenerator", "SkipLayerExcitation", "sle_pairs"]
