"""Loss functions shared by the translators.  Pure functions of tensors that return scalar tensors.

``x``: images in [-1, 1], B x 1 x H x W; ``y`` / ``c``: multi-hot float B x C.
Adversarial kinds:

- ``"wgan"``: Wasserstein critic; D minimises ``E[D(fake)] - E[D(real)]``, G minimises ``-E[D(fake)]``.
  Pair it with :func:`gradient_penalty` (WGAN-GP, as StarGAN / Fixed-Point GAN train).
- ``"bce"``: the log loss of the papers' equations, written with logits; G uses the non-saturating form
  ``-log D(G(x))``.
- ``"lsgan"``: least squares, real -> 1, fake -> 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ADV_KINDS = ("wgan", "bce", "lsgan")


def _check_kind(kind: str) -> None:
    if kind not in ADV_KINDS:
        raise ValueError(f"adversarial kind must be one of {ADV_KINDS}, got {kind!r}")


def d_adv_loss(real_logits: Tensor, fake_logits: Sequence[Tensor], kind: str = "wgan") -> Tensor:
    """Discriminator adversarial loss (to minimise).

    Args:
        real_logits: D's logits on real images (any shape; patch maps are averaged).
        fake_logits: D's logits on one or more sets of generated images.  The fake sets are
            *averaged*, so real and fake weigh the same however many translations are judged; with a
            Wasserstein critic a 2:1 fake:real weight would let D lower all outputs without bound
            (a constant shift has zero gradient, so the gradient penalty cannot stop it).
        kind: ``"wgan"``, ``"bce"`` or ``"lsgan"``.
    """
    _check_kind(kind)
    if not fake_logits:
        raise ValueError("need at least one set of fake logits")
    if kind == "wgan":
        fake = torch.stack([f.mean() for f in fake_logits]).mean()
        return fake - real_logits.mean()
    if kind == "bce":
        real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        fake = torch.stack(
            [F.binary_cross_entropy_with_logits(f, torch.zeros_like(f)) for f in fake_logits]
        ).mean()
        return real + fake
    real = ((real_logits - 1.0) ** 2).mean()
    fake = torch.stack([(f**2).mean() for f in fake_logits]).mean()
    return 0.5 * (real + fake)


def g_adv_loss(fake_logits: Tensor, kind: str = "wgan") -> Tensor:
    """Generator adversarial loss (to minimise) for one set of generated images."""
    _check_kind(kind)
    if kind == "wgan":
        return -fake_logits.mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    return 0.5 * ((fake_logits - 1.0) ** 2).mean()


def gradient_penalty(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, *, generator: torch.Generator
) -> Tensor:
    """WGAN-GP: ``E[(||grad critic(x_hat)||_2 - 1)^2]`` on random interpolates of real and fake.

    Args:
        critic: maps images to logits (patch maps are summed per image before differentiating).
        real: real images B x C x H x W.
        fake: generated images of the same shape (detached or not; the penalty only trains D).
        generator: RNG for the interpolation weights.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=generator.device)
    eps = eps.to(device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - 1.0) ** 2).mean()


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """R1: ``0.5 E[||grad_x D(x)||^2]`` on real images (``real`` must require grad)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


def domain_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Multi-label domain classification ``-log D_domain(c | x)``: BCE summed over classes, mean over B."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum") / logits.shape[0]


def l1(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference."""
    return (a - b).abs().mean()
