"""DCGAN building blocks of the sampler families (CGAN, UCGAN); their losses are in ``generators.adversarial``.

Conventions: ``x`` images float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x C over a family's
classes (all zeros allowed); ``z`` noise B x z_dim.  Image sizes are powers of two from 32 to 256; the
number of up/down-sampling blocks is derived from the size (a 4 x 4 base doubled ``log2(size) - 2`` times).

Discriminators return raw logits of shape ``B``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _sn

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 256


def num_resolution_blocks(image_size: int) -> int:
    """Number of 2x resampling blocks between a 4 x 4 base and ``image_size``.

    Args:
        image_size: side of the square image, a power of two in [32, 256].

    Returns:
        ``log2(image_size) - 2`` (3 for 32 px, 6 for 256 px).

    Raises:
        ValueError: when ``image_size`` is not a power of two in [32, 256].
    """
    size = int(image_size)
    if size != image_size or size < MIN_IMAGE_SIZE or size > MAX_IMAGE_SIZE or size & (size - 1):
        raise ValueError(
            f"image_size must be a power of two between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, got {image_size!r}"
        )
    return int(math.log2(size)) - 2


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv/linear weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0.

    Draws from the global RNG (construction time); callers seed it if they need reproducible inits.
    Call it before wrapping layers in spectral norm, whose power-iteration vectors start from these weights.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
            weight = m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.affine:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator: noise (+ class embedding) -> 1-channel image in [-1, 1].

    A linear projection to ``C0 x 4 x 4`` followed by ``log2(image_size) - 2`` transposed-conv blocks
    (kernel 4, stride 2) with batch norm and ReLU; the last block outputs ``out_channels`` through tanh.
    Widths: the block producing resolution ``4 * 2**k`` has ``channels * min(2**(n-1-k), max_mult)``
    channels, so the last hidden block has ``channels``.

    Args:
        image_size: output side, power of two in [32, 256].
        z_dim: noise dimension.
        channels: width multiplier (64 in DCGAN; tests use 4-8).
        max_mult: cap on the width multiplier, so 256 px does not reach 2048 channels.
        num_classes: size of the multi-hot ``y``; 0 makes the generator unconditional.
        embed_dim: size of the class embedding concatenated with the noise (default ``z_dim``).
        out_channels: image channels (1 for X-rays).
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        z_dim: int = 128,
        channels: int = 64,
        max_mult: int = 8,
        num_classes: int = 0,
        embed_dim: int | None = None,
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        n = num_resolution_blocks(image_size)
        self.image_size = image_size
        self.z_dim = z_dim
        self.num_classes = num_classes
        widths = [channels * min(2 ** (n - 1 - k), max_mult) for k in range(n)]
        # Multi-hot y -> sum of the embeddings of its classes (+ a bias, so "no class" is a point too).
        self.embed = nn.Linear(num_classes, embed_dim or z_dim) if num_classes > 0 else None
        in_dim = z_dim + (self.embed.out_features if self.embed is not None else 0)
        self.project = nn.Sequential(
            nn.Linear(in_dim, widths[0] * 16, bias=False),
            nn.Unflatten(1, (widths[0], 4, 4)),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        for k in range(1, n):
            blocks += [
                nn.ConvTranspose2d(widths[k - 1], widths[k], 4, 2, 1, bias=False),
                nn.BatchNorm2d(widths[k]),
                nn.ReLU(inplace=True),
            ]
        blocks += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        init_dcgan_weights(self)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Generate images.

        Args:
            z: noise, B x z_dim.
            y: multi-hot classes, B x num_classes; required iff the generator is conditional.

        Returns:
            Images B x out_channels x image_size x image_size in [-1, 1].
        """
        if self.embed is not None:
            if y is None:
                raise ValueError("this generator is conditional: pass y (B x num_classes)")
            z = torch.cat([z, self.embed(y.to(z.dtype))], dim=1)
        return self.blocks(self.project(z))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator with optional spectral norm and class conditioning.

    ``log2(image_size) - 2`` strided conv blocks (kernel 4, stride 2, LeakyReLU 0.2) down to 4 x 4,
    then a linear head on the flattened features.  The block producing resolution ``size / 2**(k+1)``
    has ``channels * min(2**k, max_mult)`` channels.

    Conditioning (``num_classes > 0``):
      * ``"projection"`` (Miyato & Koyama 2018): ``logit = w . phi(x) + <E y, phi(x)>`` with ``phi`` the
        flattened features and ``E y`` the sum of the embeddings of the classes in the multi-hot ``y``.
      * ``"concat"`` (Mirza & Osindero 2014): ``y`` broadcast to constant maps joined with the image.

    Args:
        image_size: input side, power of two in [32, 256].
        channels: width multiplier.
        max_mult: cap on the width multiplier.
        num_classes: size of ``y``; 0 makes the discriminator unconditional.
        conditioning: ``"projection"`` or ``"concat"`` (ignored when ``num_classes == 0``).
        norm: ``"batch"`` (DCGAN) or ``"none"`` (use with WGAN-GP, whose penalty is per sample, and
            usually with spectral norm).  The first block is never normalised, as in DCGAN.
        spectral_norm: wrap every conv/linear (and the projection embedding) in spectral norm.
        in_channels: image channels.
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        channels: int = 64,
        max_mult: int = 8,
        num_classes: int = 0,
        conditioning: str = "projection",
        norm: str = "batch",
        spectral_norm: bool = False,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if conditioning not in ("projection", "concat"):
            raise ValueError(f"conditioning must be 'projection' or 'concat', got {conditioning!r}")
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        n = num_resolution_blocks(image_size)
        self.image_size = image_size
        self.num_classes = num_classes
        self.conditioning = conditioning if num_classes > 0 else "none"

        def sn(m: nn.Module) -> nn.Module:
            init_dcgan_weights(m)  # before the parametrisation, so its u/v match the initial weights
            return _sn(m) if spectral_norm else m

        widths = [channels * min(2**k, max_mult) for k in range(n)]
        c_in = in_channels + (num_classes if self.conditioning == "concat" else 0)
        layers: list[nn.Module] = []
        for k, w in enumerate(widths):
            layers.append(sn(nn.Conv2d(c_in, w, 4, 2, 1, bias=norm == "none" or k == 0)))
            if norm == "batch" and k > 0:
                layers.append(nn.BatchNorm2d(w))
                init_dcgan_weights(layers[-1])
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = w
        self.blocks = nn.Sequential(*layers)
        feat_dim = widths[-1] * 16
        self.head = sn(nn.Linear(feat_dim, 1))
        self.embed = (
            sn(nn.Linear(num_classes, feat_dim, bias=False)) if self.conditioning == "projection" else None
        )

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Score images.

        Args:
            x: images B x in_channels x H x W in [-1, 1].
            y: multi-hot classes B x num_classes; required iff the discriminator is conditional.

        Returns:
            Logits of shape B (higher = more real).
        """
        if self.num_classes > 0 and y is None:
            raise ValueError("this discriminator is conditional: pass y (B x num_classes)")
        if self.conditioning == "concat":
            maps = y.to(x.dtype)[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, maps], dim=1)
        phi = self.blocks(x).flatten(1)
        out = self.head(phi).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y.to(phi.dtype)) * phi).sum(dim=1)
        return out
