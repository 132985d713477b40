"""Classic image augmentation for chest X-rays: a small affine (rotation, translation, scale) and
brightness / contrast as ``torchvision.transforms.v2`` defines them, on uint8 batches.

No horizontal flip: the heart's side is signal. The transform runs on the collated uint8 batch
B x 1 x H x W in the training loop (not per item in the loader; on the training device), one draw
of parameters per image from an explicit ``torch.Generator``: the same generator state gives the
same bytes. It is one batched pass (a single ``grid_sample``) that reproduces v2's per-image
``affine`` / ``adjust_brightness`` / ``adjust_contrast`` (:meth:`ClassicAugment.reference`, tested
equal), so the loader is never the bottleneck.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


class ClassicAugment:
    """Per-image random affine + brightness/contrast on a uint8 batch.

    Args:
        degrees: rotation drawn uniformly from [-degrees, degrees].
        translate: shift drawn uniformly from [-translate, translate] x the side length, per axis.
        scale: zoom factor drawn uniformly from [scale[0], scale[1]].
        brightness: factor drawn from [1 - brightness, 1 + brightness].
        contrast: factor drawn from [1 - contrast, 1 + contrast].

    Raises:
        ValueError: negative ranges, or a scale range that is not 0 < low <= high.
    """

    def __init__(self, degrees: float = 10.0, translate: float = 0.06, scale: Sequence[float] = (0.9, 1.1),
                 brightness: float = 0.1, contrast: float = 0.1) -> None:
        lo, hi = (float(v) for v in scale)
        if min(degrees, translate, brightness, contrast) < 0 or not 0 < lo <= hi or brightness >= 1 or contrast >= 1:
            raise ValueError(f"classic augmentation needs degrees, translate >= 0, 0 <= brightness, contrast < 1 and "
                             f"0 < scale[0] <= scale[1]; got degrees={degrees}, translate={translate}, scale={list(scale)}, "
                             f"brightness={brightness}, contrast={contrast}")
        self.degrees, self.translate, self.scale = float(degrees), float(translate), (lo, hi)
        self.brightness, self.contrast = float(brightness), float(contrast)

    def params(self, b: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        """Per-image parameters B x 5 (float64): angle (degrees), tx, ty (whole pixels), scale,
        brightness factor, contrast factor: B x 6 uniforms from ``generator``."""
        u = torch.rand(b, 6, generator=generator, dtype=torch.float64) * 2 - 1  # [-1, 1)
        angle = u[:, 0] * self.degrees
        tx = torch.round(u[:, 1] * self.translate * w)
        ty = torch.round(u[:, 2] * self.translate * h)
        s = self.scale[0] + (u[:, 3] + 1) / 2 * (self.scale[1] - self.scale[0])
        return torch.stack([angle, tx, ty, s, 1.0 + u[:, 4] * self.brightness, 1.0 + u[:, 5] * self.contrast], 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``images`` (uint8 B x 1 x H x W, on any device); returns a new uint8 batch.

        One batched pass (one ``grid_sample`` for the whole batch, per-image matrices) that computes
        what ``torchvision.transforms.v2.functional`` ``affine`` (bilinear, fill 0, no shear),
        ``adjust_brightness`` and ``adjust_contrast`` give image by image (:meth:`reference`).
        """
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"ClassicAugment takes uint8 B x C x H x W, got {images.dtype} {tuple(images.shape)}")
        b, c, h, w = images.shape
        if b == 0:
            return images.clone()
        p = self.params(b, h, w, generator)
        dev = images.device
        # v2's inverse affine matrix (center 0, shear 0), in float64 like torchvision, then float32
        rot = torch.deg2rad(p[:, 0])
        cos, sin, s, tx, ty = torch.cos(rot), torch.sin(rot), p[:, 3], p[:, 1], p[:, 2]
        m0, m1, m3, m4 = cos / s, sin / s, -sin / s, cos / s
        theta = torch.stack([torch.stack([m0, m1, -m0 * tx - m1 * ty], 1),
                             torch.stack([m3, m4, -m3 * tx - m4 * ty], 1)], 1).to(torch.float32).to(dev)
        base = torch.empty(1, h, w, 3, dtype=torch.float32, device=dev)
        base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
        base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze_(-1))
        base[..., 2].fill_(1)
        scale = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=dev)
        grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(theta.transpose(1, 2) / scale).view(b, h, w, 2)
        x = torch.cat([images.to(torch.float32), torch.ones(b, 1, h, w, device=dev)], 1)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = (x[:, :c] * x[:, c:]).round_()  # fill 0 outside, as v2 blends with its mask channel
        x = x.to(torch.uint8)
        bright = p[:, 4].to(torch.float32).to(dev).view(b, 1, 1, 1)
        x = (x.to(torch.float32) * bright).clamp_(0, 255).to(torch.uint8)  # v2 truncates to uint8
        ratio = p[:, 5].to(dev).view(b, 1, 1, 1)
        mean = x.to(torch.float32).mean(dim=(-3, -2, -1), keepdim=True)
        out = x.to(torch.float32) * ratio.to(torch.float32) + mean * (1.0 - ratio).to(torch.float32)
        return out.clamp_(0, 255).to(torch.uint8)

    def reference(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The same draws applied image by image with ``torchvision.transforms.v2.functional`` (slow;
        the definition :meth:`__call__` computes in one batch)."""
        b, _, h, w = images.shape
        p = self.params(b, h, w, generator)
        out = torch.empty_like(images)
        for i in range(b):
            im = TF.affine(images[i], angle=float(p[i, 0]), translate=[float(p[i, 1]), float(p[i, 2])],
                           scale=float(p[i, 3]), shear=[0.0, 0.0], interpolation=InterpolationMode.BILINEAR, fill=0)
            im = TF.adjust_brightness(im, float(p[i, 4]))
            out[i] = TF.adjust_contrast(im, float(p[i, 5]))
        return out

    def __repr__(self) -> str:
        return (f"ClassicAugment(degrees={self.degrees}, translate={self.translate}, scale={list(self.scale)}, "
                f"brightness={self.brightness}, contrast={self.contrast})")


__all__ = ["ClassicAugment"]
