"""Non-adversarial loss terms shared by the translators.  Pure functions of tensors that return scalars.

``x``: images in [-1, 1], B x 1 x H x W; ``y`` / ``c``: multi-hot float B x C.  The adversarial losses
and penalties (wgan, bce, lsgan, hinge; gradient penalty, R1) are in ``generators.adversarial``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def domain_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Multi-label domain classification ``-log D_domain(c | x)``: BCE summed over classes, mean over B."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum") / logits.shape[0]


def l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference."""
    return (a - b).abs().mean()
