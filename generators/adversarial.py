"""The adversarial toolkit every GAN family uses: losses, penalties, ``frozen`` and noise draws.

Conventions: ``x`` images float in [-1, 1], B x 1 x H x W.  Discriminators return raw logits (shape B,
or a patch map B x 1 x h x w that the losses average); the losses here take logits.

Kinds (``KINDS``), written as in MONAI's ``PatchAdversarialLoss(criterion=...)`` so one vocabulary
serves CGAN, UCGAN, Fixed-Point GAN, TagGAN and Branched GAN:

- ``"bce"``: the log loss of the papers' equations, with logits; D minimises
  ``-log D(x) - log(1 - D(G(z)))`` (XRAY-GAN Eq. 1/6), G the non-saturating ``-log D(G(z))``.
- ``"hinge"``: D ``relu(1 - D(x)) + relu(1 + D(G(z)))``, G ``-D(G(z))``.
- ``"lsgan"``: least squares, real -> 1, fake -> 0: D ``0.5 ((D(x) - 1)^2 + D(G(z))^2)``,
  G ``0.5 (D(G(z)) - 1)^2``.
- ``"wgan"``: Wasserstein critic; D ``D(G(z)) - D(x)``, G ``-D(G(z))``.  Pair it with
  :func:`gradient_penalty` (WGAN-GP).  ``"wgan-gp"`` is accepted as another spelling (the CGAN
  config's).

Every discriminator call on images goes through :func:`discriminate`: the one place where
differentiable augmentation of D's inputs (and, in :func:`d_loss`, LeCam regularisation of its
outputs) will be added for every family at once.

Random draws use the ``torch.Generator`` handed in by the training loop, never the global RNG; they are
made on the generator's own device and then moved, so the same seed gives the same numbers whatever
device the model is on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("bce", "hinge", "lsgan", "wgan")
ALIASES = {"wgan-gp": "wgan"}

T = TypeVar("T")


def check_kind(kind: str) -> str:
    """The canonical name of an adversarial loss kind (``"wgan-gp"`` -> ``"wgan"``).

    Raises:
        ValueError: for an unknown kind; the message lists the choices.
    """
    canonical = ALIASES.get(kind, kind)
    if canonical not in KINDS:
        choices = ", ".join([*KINDS, *ALIASES])
        raise ValueError(f"unknown adversarial loss {kind!r}; choose one of {choices}")
    return canonical


# ----------------------------------------------------------------------------------------------------
# The seam: every discriminator call on images.


def discriminate(D: Callable[..., T], x: Tensor, *cond: Tensor) -> T:
    """``D(x, *cond)``: how every family shows images (real, generated, interpolated) to a discriminator.

    Today it only calls ``D``.  It exists so that differentiable augmentation of D's inputs
    (DiffAugment / ADA) is added here once, for every family, rather than at each call site.

    Args:
        D: a discriminator (or a function of images, e.g. one head of a multi-head D).
        x: images B x C x H x W.
        cond: conditioning passed through unchanged (e.g. CGAN's multi-hot ``y``).

    Returns:
        Whatever ``D`` returns (logits, or a tuple of heads).
    """
    return D(x, *cond)


# ----------------------------------------------------------------------------------------------------
# Losses.


def _real_term(kind: str, real: Tensor) -> Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    if kind == "hinge":
        return F.relu(1.0 - real).mean()
    if kind == "lsgan":
        return ((real - 1.0) ** 2).mean()
    return real.mean()


def _fake_term(kind: str, fake: Tensor) -> Tensor:
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if kind == "hinge":
        return F.relu(1.0 + fake).mean()
    if kind == "lsgan":
        return (fake**2).mean()
    return fake.mean()


def d_loss(kind: str, real_logits: Tensor, fake_logits: Tensor | Sequence[Tensor], *, upcast: bool = True) -> Tensor:
    """Discriminator adversarial loss (to minimise), without penalties.

    Args:
        kind: one of ``KINDS`` (or an alias, see :func:`check_kind`).
        real_logits: D's logits on real images (any shape; patch maps are averaged).
        fake_logits: D's logits on generated images: one tensor, or a sequence of sets (e.g. a
            translator's cross- and same-domain outputs).  Sets are *averaged*, so real and fake weigh
            the same however many translations are judged; with a Wasserstein critic a 2:1 fake:real
            weight would let D lower all outputs without bound (a constant shift has zero gradient, so
            the gradient penalty cannot stop it).
        upcast: compute in float32 (``logits.float()`` first), so bf16 logits under autocast are
            reduced in float32.  The translators pass ``False``: they have always reduced in the
            logits' own dtype, and ``False`` keeps their mixed-precision runs bit-identical.  The two
            agree exactly on float32 logits.

    Returns:
        Scalar loss: ``real + fake`` terms (``0.5 (real + fake)`` for lsgan, ``fake - real`` for wgan).
    """
    kind = check_kind(kind)
    single = isinstance(fake_logits, Tensor)
    fakes = [fake_logits] if single else list(fake_logits)
    if not fakes:
        raise ValueError("need at least one set of fake logits")
    real = real_logits.float() if upcast else real_logits
    fakes = [f.float() for f in fakes] if upcast else fakes

    def fake_term() -> Tensor:
        if single:
            return _fake_term(kind, fakes[0])
        return torch.stack([_fake_term(kind, f) for f in fakes]).mean()

    # The terms are built in the order the families always built them (autograd then accumulates
    # D's gradients in the same order): fake first for wgan, real first otherwise.
    if kind == "wgan":
        fake = fake_term()
        return fake - _real_term(kind, real)
    real_term = _real_term(kind, real)
    if kind == "lsgan":
        return 0.5 * (real_term + fake_term())
    return real_term + fake_term()


def g_loss(kind: str, fake_logits: Tensor, *, upcast: bool = True) -> Tensor:
    """Generator adversarial loss (to minimise) for one set of generated images.

    Non-saturating ``-log D(G(z))`` for bce, ``0.5 (D(G(z)) - 1)^2`` for lsgan, ``-D(G(z))`` for hinge
    and wgan.  ``upcast`` as in :func:`d_loss`.
    """
    kind = check_kind(kind)
    fake = fake_logits.float() if upcast else fake_logits
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if kind == "lsgan":
        return 0.5 * ((fake - 1.0) ** 2).mean()
    return -fake.mean()


# ----------------------------------------------------------------------------------------------------
# Penalties.


def gradient_penalty(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, *, generator: torch.Generator
) -> Tensor:
    """WGAN-GP ``E[(||grad_x D(x_hat)||_2 - 1)^2]`` on random interpolates (Gulrajani et al. 2017).

    The critic's output and the gradient are reduced in float32.  This is the same computation as the
    translators' former ``out.sum()`` / ``grad.norm()``: the sum only seeds ``autograd.grad`` with
    ones (exact in any dtype), and ``grad`` has the dtype of ``x_hat``, float32 like ``real``, so the
    ``.float()`` calls change no number, under bf16 autocast included.

    Args:
        critic: maps images to logits (patch maps are summed); e.g. ``lambda v: discriminate(D, v, y)``.
        real: real images B x C x H x W.
        fake: generated images of the same shape (detached here; only ``x_hat`` is differentiated).
        generator: source of the interpolation weights.

    Returns:
        Scalar penalty with a graph to the critic's parameters (``create_graph=True``).
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ")
    eps = rand((real.shape[0], 1, 1, 1), generator=generator, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.float().sum(), x_hat, create_graph=True)
    return ((grad.float().flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def r1_penalty(real_logits: Tensor, real: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ``0.5 E[||grad_x D(x)||^2]`` on real images.

    Args:
        real_logits: D's logits on ``real``, computed with a graph to it.
        real: the real images, which must require grad.
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return 0.5 * grad.pow(2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------------
# Gradients and noise.


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of the modules' parameters inside the block, restoring it after.

    Gradients still flow *through* the modules to their inputs (e.g. from D back to G); only the
    modules' own weight gradients are skipped.
    """
    params = [p for m in modules for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)


def randn(
    shape: tuple[int, ...], *, generator: torch.Generator, device: torch.device | str, dtype: torch.dtype | None = None
) -> Tensor:
    """Standard normal draws from ``generator`` (on its own device), returned on ``device`` (and ``dtype``)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)


def rand(
    shape: tuple[int, ...], *, generator: torch.Generator, device: torch.device | str, dtype: torch.dtype | None = None
) -> Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its own device), returned on ``device`` (and ``dtype``)."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)


def randperm(n: int, *, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """A permutation of ``range(n)`` from ``generator`` (on its own device), returned on ``device``."""
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


__all__ = [
    "ALIASES",
    "KINDS",
    "check_kind",
    "d_loss",
    "discriminate",
    "frozen",
    "g_loss",
    "gradient_penalty",
    "r1_penalty",
    "rand",
    "randn",
    "randperm",
]
