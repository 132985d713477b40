"""Network blocks shared by the translators (Fixed-Point GAN, TagGAN, Branched GANs).

``x``: images, float in [-1, 1], B x 1 x H x W.  ``c``: conditioning vector B x D (a multi-hot target
over the family's classes, or a style vector); it is tiled over the image plane and concatenated to the
input as extra channels.  Written from the papers' descriptions (StarGAN-style encoder / residual
bottleneck / decoder with U-Net skips; PatchGAN discriminator with an optional domain head).

The networks only compute: no optimisers, devices or losses here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn


def tile_condition(x: Tensor, c: Tensor) -> Tensor:
    """Concatenate ``c`` (B x D) to ``x`` (B x C x H x W) as D constant planes."""
    if c.dim() != 2 or c.shape[0] != x.shape[0]:
        raise ValueError(f"condition must be B x D with B={x.shape[0]}, got {tuple(c.shape)}")
    planes = c.to(dtype=x.dtype)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return torch.cat([x, planes], dim=1)


def bounded_residual(x: Tensor, raw: Tensor) -> Tensor:
    """Image plus a learned change that can never leave [-1, 1].

    ``t = tanh(raw)`` in (-1, 1) says how far each pixel moves towards white (t > 0) or black (t < 0):
    ``out = x + t (1 - x)`` for t >= 0 and ``out = x + t (1 + x)`` for t < 0, a convex blend of ``x`` and
    the bound.  ``raw = 0`` is exactly the identity, unlike ``tanh(x + raw)`` which cannot represent the
    identity at saturated pixels (x = +-1 needs raw = +-inf), and radiographs have many such pixels.
    """
    t = torch.tanh(raw)
    return x + F.relu(t) * (1.0 - x) - F.relu(-t) * (1.0 + x)


class ResBlock(nn.Module):
    """conv3x3 - IN - ReLU - conv3x3 - IN, plus the input."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False),
            nn.InstanceNorm2d(ch, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, 1, 1, bias=False),
            nn.InstanceNorm2d(ch, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 4, 2, 1, bias=False),
        nn.InstanceNorm2d(cout, affine=True),
        nn.ReLU(inplace=True),
    )


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
        nn.InstanceNorm2d(cout, affine=True),
        nn.ReLU(inplace=True),
    )


class UNetGenerator(nn.Module):
    """Encoder - residual bottleneck - decoder, conditioned by tiling ``c`` as input channels.

    Returns the *raw* last-layer output (no activation); each family decides how it becomes an image
    (a bounded residual, a disease map, a branch).

    Args:
        cond_dim: length D of the conditioning vector (0 = unconditional).
        in_chans: image channels.
        out_chans: output channels.
        width: channels after the stem; doubled at each down-sampling, capped at ``max_width``.
        n_down: number of stride-2 down-samplings (the bottleneck is ``H / 2**n_down``; keep it >= 2,
            instance norm needs more than one pixel).
        n_res: residual blocks at the bottleneck.
        max_width: channel cap.
        skips: U-Net skip connections from each encoder level to the decoder level of the same size
            (the Branched-GAN paper adds them "to preserve delicate details").
    """

    def __init__(
        self,
        *,
        cond_dim: int,
        in_chans: int = 1,
        out_chans: int = 1,
        width: int = 64,
        n_down: int = 2,
        n_res: int = 6,
        max_width: int = 256,
        skips: bool = True,
    ) -> None:
        super().__init__()
        if width < 1 or n_down < 0 or n_res < 0:
            raise ValueError(f"need width >= 1, n_down >= 0, n_res >= 0; got {width}, {n_down}, {n_res}")
        self.cond_dim = cond_dim
        self.n_down = n_down
        self.skips = skips
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans + cond_dim, width, 7, 1, 3, bias=False),
            nn.InstanceNorm2d(width, affine=True),
            nn.ReLU(inplace=True),
        )
        chans = [width]
        for _ in range(n_down):
            chans.append(min(chans[-1] * 2, max_width))
        self.downs = nn.ModuleList(_down(chans[i], chans[i + 1]) for i in range(n_down))
        self.res = nn.Sequential(*(ResBlock(chans[-1]) for _ in range(n_res)))
        self.ups = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for i in range(n_down, 0, -1):
            self.ups.append(_up(chans[i], chans[i - 1]))
            if skips:
                # concat(decoder, encoder) -> back to the level's width
                self.fuse.append(
                    nn.Sequential(
                        nn.Conv2d(2 * chans[i - 1], chans[i - 1], 3, 1, 1, bias=False),
                        nn.InstanceNorm2d(chans[i - 1], affine=True),
                        nn.ReLU(inplace=True),
                    )
                )
        self.head = nn.Conv2d(width, out_chans, 7, 1, 3)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Raw output B x out_chans x H x W for image ``x`` and condition ``c`` (B x cond_dim)."""
        if self.cond_dim:
            if c is None:
                raise ValueError(f"this generator is conditional (cond_dim={self.cond_dim}); pass c")
            x = tile_condition(x, c)
        h = self.stem(x)
        feats = [h]
        for down in self.downs:
            h = down(h)
            feats.append(h)
        h = self.res(h)
        for k, up in enumerate(self.ups):
            h = up(h)
            if self.skips:
                h = self.fuse[k](torch.cat([h, feats[-2 - k]], dim=1))
        return self.head(h)


class PatchDiscriminator(nn.Module):
    """PatchGAN critic with an optional domain-classification head.

    Stride-2 4x4 convolutions with LeakyReLU and no normalisation (a gradient penalty and batch or
    instance statistics do not mix).  The adversarial head is a 3x3 convolution giving ``n_adv`` logit
    maps over patches; the domain head pools the last features globally and predicts ``n_classes``
    logits.

    Args:
        image_size: input side length (a power of two).
        in_chans: image channels.
        width: channels of the first layer, doubled each layer, capped at ``max_width``.
        n_layers: down-samplings; default ``log2(image_size) - 2`` capped at 6 (a 4 x 4 patch map at
            32-256 px).
        n_classes: domain logits (0 = no domain head).
        n_adv: adversarial logit maps (1, or one per domain for a multi-task critic).
        max_width: channel cap.
        spectral_norm: wrap every convolution and the domain head in spectral norm (Miyato et al. 2018).
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_chans: int = 1,
        width: int = 64,
        n_layers: int | None = None,
        n_classes: int = 0,
        n_adv: int = 1,
        max_width: int = 512,
        spectral_norm: bool = False,
    ) -> None:
        super().__init__()

        def sn(m: nn.Module) -> nn.Module:
            return _sn(m) if spectral_norm else m

        if n_layers is None:
            n_layers = min(max(int(math.log2(image_size)) - 2, 1), 6)
        if image_size // 2**n_layers < 1:
            raise ValueError(f"n_layers={n_layers} down-samples a {image_size} px image below 1 px")
        layers: list[nn.Module] = []
        cin, cout = in_chans, width
        for _ in range(n_layers):
            layers += [sn(nn.Conv2d(cin, cout, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            cin, cout = cout, min(cout * 2, max_width)
        self.body = nn.Sequential(*layers)
        self.adv = sn(nn.Conv2d(cin, n_adv, 3, 1, 1))
        self.cls = sn(nn.Linear(cin, n_classes)) if n_classes > 0 else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(adversarial logits B x n_adv x h x w, domain logits B x n_classes or None)."""
        h = self.body(x)
        cls = self.cls(h.mean(dim=(2, 3))) if self.cls is not None else None
        return self.adv(h), cls


class MappingNetwork(nn.Module):
    """Class vector -> style vector (the Branched-GAN paper's style source: no style encoder).

    A small MLP on the multi-hot target; its bias makes the all-zeros (``No Finding``) input a
    learned healthy style.
    """

    def __init__(self, *, n_classes: int, style_dim: int = 16, hidden: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = n_classes
        for _ in range(n_layers - 1):
            layers += [nn.Linear(cin, hidden), nn.ReLU(inplace=True)]
            cin = hidden
        layers.append(nn.Linear(cin, style_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, c: Tensor) -> Tensor:
        """Style B x style_dim for targets B x n_classes."""
        return self.net(c)


def check_bottleneck(image_size: int, n_down: int) -> None:
    """Raise ``ValueError`` unless ``image_size`` is a power of two whose bottleneck stays >= 2 px."""
    if image_size < 4 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 4, got {image_size}")
    if image_size // 2**n_down < 2:
        raise ValueError(
            f"n_down={n_down} leaves a {image_size // 2**n_down} px bottleneck at {image_size} px; "
            f"use n_down <= {int(math.log2(image_size)) - 1}"
        )


class ResidualGenerator(nn.Module):
    """G(x, c) -> ``bounded_residual(x, UNet(x, c))``: the input plus a learned change, kept in [-1, 1].

    Args:
        n_classes: length of the target vector ``c``.
        in_chans: image channels.
        width, n_down, n_res, max_width, skips: see :class:`UNetGenerator`.
    """

    def __init__(
        self,
        *,
        n_classes: int,
        in_chans: int = 1,
        width: int = 64,
        n_down: int = 2,
        n_res: int = 6,
        max_width: int = 256,
        skips: bool = False,
    ) -> None:
        super().__init__()
        self.net = UNetGenerator(
            cond_dim=n_classes,
            in_chans=in_chans,
            out_chans=in_chans,
            width=width,
            n_down=n_down,
            n_res=n_res,
            max_width=max_width,
            skips=skips,
        )

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Translated image B x C x H x W in [-1, 1]."""
        return bounded_residual(x, self.net(x, c))
