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
differentiable augmentation of D's inputs is applied for every family at once; :func:`d_loss` adds
LeCam regularisation of its outputs and feeds ADA's overfitting signal.  Both read a
:class:`DiscriminatorRegulariser` (one per discriminator, built by :func:`make_regulariser` from the
config keys ``diffaug``, ``diffaug_p``, ``diffaug_adaptive``, ``ada_target``, ``ada_images``,
``lecam_weight``, ``lecam_decay`` that every family accepts).

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


def discriminate(
    D: Callable[..., T],
    x: Tensor,
    *cond: Tensor,
    reg: DiscriminatorRegulariser | None = None,
    generator: torch.Generator | None = None,
) -> T:
    """``D(aug(x), *cond)``: how every family shows images (real, generated, interpolated) to a discriminator.

    With a regulariser ``reg`` whose policy is not empty, ``x`` is first passed through its
    differentiable augmentation (:meth:`DiscriminatorRegulariser.augment`): every call, for real and
    generated images, in D steps and G steps alike, with fresh draws from ``generator``.  Gradients
    flow through the augmentation to ``x`` (so G learns through it, and R1 / the gradient penalty
    are taken with respect to the un-augmented images).  Without ``reg`` (or with an empty policy) it
    only calls ``D`` and draws nothing.

    Args:
        D: a discriminator (or a function of images, e.g. one head of a multi-head D).
        x: images B x C x H x W.
        cond: conditioning passed through unchanged (e.g. CGAN's multi-hot ``y``).
        reg: the family's regulariser for this discriminator, or None.
        generator: source of the augmentation draws (required when ``reg`` augments).

    Returns:
        Whatever ``D`` returns (logits, or a tuple of heads).
    """
    if reg is not None and reg.augments:
        if generator is None:
            raise ValueError("discriminate: augmentation needs the step's torch.Generator (generator=...)")
        x = reg.augment(x, generator=generator)
    return D(x, *cond)


# ----------------------------------------------------------------------------------------------------
# Differentiable augmentation (DiffAugment, Zhao et al. 2020; adaptive probability as ADA, Karras et
# al. 2020) and LeCam regularisation (Tseng et al. 2021), written from the papers' descriptions.

AUG_OPS = ("translation", "cutout", "brightness", "contrast")


def parse_policy(policy: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"translation,cutout"`` / a list / None -> a tuple of known op names (empty: no augmentation).

    Raises:
        ValueError: for an unknown op (horizontal flip is deliberately absent: chest X-rays are not
            left-right symmetric, and a flipped heart is a different finding).
    """
    if policy is None:
        return ()
    items = [p.strip() for p in policy.split(",")] if isinstance(policy, str) else [str(p).strip() for p in policy]
    items = [p for p in items if p]
    bad = [p for p in items if p not in AUG_OPS]
    if bad:
        raise ValueError(f"unknown augmentation op(s) {bad}; choose from {', '.join(AUG_OPS)}")
    return tuple(dict.fromkeys(items))


def _brightness(x: Tensor, u: Tensor) -> Tensor:
    """``x + (u - 0.5)``: a per-image offset in [-0.5, 0.5) (images in [-1, 1])."""
    return x + (u - 0.5).view(-1, 1, 1, 1)


def _contrast(x: Tensor, u: Tensor) -> Tensor:
    """``(x - mean) * (u + 0.5) + mean``: a per-image contrast factor in [0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u + 0.5).view(-1, 1, 1, 1) + mean


def _translation(x: Tensor, ux: Tensor, uy: Tensor, ratio: float) -> Tensor:
    """Shift each image by an integer offset of at most ``ratio`` of its side, filling with 0.

    ``out[i, j] = x[i + ty, j + tx]`` (0 outside), written as ``S_y x S_x^T`` with 0/1 shift matrices:
    two batched matrix products, whose backward is two more (much cheaper on CPU than the backward of
    an advanced-indexing gather), and the gradient reaches every pixel that stays in view.
    """
    b, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if sh == 0 and sw == 0:
        return x
    ty = (uy * (2 * sh + 1)).long().clamp_max(2 * sh) - sh  # uniform over -sh..sh
    tx = (ux * (2 * sw + 1)).long().clamp_max(2 * sw) - sw
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    s_y = (ar_h[None, :, None] + ty[:, None, None] == ar_h[None, None, :]).to(x.dtype)  # B x H x H
    s_x = (ar_w[None, None, :] + tx[:, None, None] == ar_w[None, :, None]).to(x.dtype)  # B x W x W (S_x^T)
    return s_y[:, None] @ x @ s_x[:, None]


def _cutout(x: Tensor, ux: Tensor, uy: Tensor, ratio: float) -> Tensor:
    """Zero a square of side ``ratio`` of the image at a random centre (clipped at the borders)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (uy * h).long().clamp_max(h - 1)
    cx = (ux * w).long().clamp_max(w - 1)
    r = torch.arange(h, device=x.device)[None, :]
    q = torch.arange(w, device=x.device)[None, :]
    in_r = (r >= (cy - ch // 2)[:, None]) & (r < (cy - ch // 2 + ch)[:, None])  # B x H
    in_q = (q >= (cx - cw // 2)[:, None]) & (q < (cx - cw // 2 + cw)[:, None])  # B x W
    keep = ~(in_r[:, :, None] & in_q[:, None, :])
    return x * keep[:, None].to(x.dtype)


def diff_augment(
    x: Tensor,
    policy: Sequence[str],
    *,
    p: float | Tensor = 1.0,
    generator: torch.Generator,
    translation: float = 0.125,
    cutout: float = 0.5,
) -> Tensor:
    """Differentiable augmentation of a batch of images (DiffAugment's ops, ADA's per-image probability).

    Ops run in the order colour (brightness, contrast), translation, cutout; each op is applied to
    each image independently with probability ``p`` (``p = 1``: always, DiffAugment; ADA adapts ``p``).
    Every draw comes from ``generator`` (a fixed number of draws per op whatever ``p``), so the same
    seed gives the same bytes.

    Args:
        x: images B x C x H x W in [-1, 1].
        policy: op names from ``AUG_OPS`` (see :func:`parse_policy`).
        p: per-image probability of each op (float or 0-d tensor).
        generator: the step's generator.
        translation: largest shift as a fraction of the side (DiffAugment: 1/8).
        cutout: side of the cut-out square as a fraction of the image side (DiffAugment: 1/2).

    Returns:
        Augmented images, same shape and dtype, with a graph to ``x``.
    """
    b = x.shape[0]

    def u(n: int = 1) -> Tensor:
        return rand((n, b), generator=generator, device=x.device, dtype=torch.float32)

    p_t = torch.as_tensor(p, dtype=torch.float32, device=x.device)
    for op in policy:
        draws = u(3)
        apply = draws[0] < p_t
        if op == "brightness":
            out = _brightness(x, draws[1].to(x.dtype))
        elif op == "contrast":
            out = _contrast(x, draws[1].to(x.dtype))
        elif op == "translation":
            out = _translation(x, draws[1], draws[2], translation)
        elif op == "cutout":
            out = _cutout(x, draws[1], draws[2], cutout)
        else:
            raise ValueError(f"unknown augmentation op {op!r}; choose from {', '.join(AUG_OPS)}")
        x = torch.where(apply.view(-1, 1, 1, 1), out, x)
    return x


def lecam_penalty(real_logits: Tensor, fake_logits: Tensor, anchor_real: Tensor, anchor_fake: Tensor) -> Tensor:
    """LeCam (Tseng et al. 2021, Eq. 3): ``E||D(x) - a_F||^2 + E||D(G(z)) - a_R||^2`` in float32.

    The anchors are running means of D's outputs on generated (``a_F``) and real (``a_R``) images;
    the penalty pulls real outputs toward the fake anchor and fake outputs toward the real one, which
    keeps D's predictions in a bounded band when few real images let it overfit.
    """
    r, f = real_logits.float(), fake_logits.float()
    return (r - anchor_fake.detach()).pow(2).mean() + (f - anchor_real.detach()).pow(2).mean()


class DiscriminatorRegulariser(nn.Module):
    """The few-shot tools of one discriminator: augmentation of its inputs, ADA probability, LeCam.

    State (buffers, so checkpoints hold it and a resumed run continues exactly): the augmentation
    probability ``p``, the ADA accumulators, the LeCam anchors.  No parameters.

    Use: ``discriminate(D, x, reg=reg, generator=g)`` augments every input of D;
    ``d_loss(kind, real, fake, reg=reg)`` adds ``lecam_weight`` times the LeCam penalty and feeds the
    ADA signal.  Both are called on D's *outputs on augmented images*.

    Args:
        policy: augmentation ops (``AUG_OPS``), a list or a comma-separated string; empty: none.
        p: augmentation probability per op and image (fixed), or the initial value when ``adaptive``.
        adaptive: adjust ``p`` as ADA: every ``ada_interval`` D updates,
            ``p += sign(r_t - ada_target) * images / ada_images`` clamped to [0, 1], with the overfitting
            signal ``r_t = E[sign(D(real) - centre)]`` (centre 0 for bce/hinge, 0.5 for lsgan, the
            batch's mean fake output for wgan, whose critic has no fixed zero).
        ada_target: target of ``r_t`` (ADA: 0.6).
        ada_images: real images shown for ``p`` to move by 1 (ADA: 500k; few-shot CPU runs need far fewer).
        ada_interval: D updates between adjustments (ADA: 4).
        lecam_weight: LeCam weight ``lambda`` (0: off).
        lecam_decay: decay of the anchors' running means (Tseng et al.: 0.99).
        translation: largest shift (fraction of the side).
        cutout: cut-out square side (fraction of the side).
    """

    def __init__(
        self,
        *,
        policy: str | Sequence[str] | None = (),
        p: float = 1.0,
        adaptive: bool = False,
        ada_target: float = 0.6,
        ada_images: int = 20000,
        ada_interval: int = 4,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.99,
        translation: float = 0.125,
        cutout: float = 0.5,
    ) -> None:
        super().__init__()
        self.policy = parse_policy(policy)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        if ada_images < 1 or ada_interval < 1:
            raise ValueError(f"ada_images and ada_interval must be >= 1, got {ada_images} and {ada_interval}")
        if lecam_weight < 0 or not 0.0 <= lecam_decay < 1.0:
            raise ValueError(f"need lecam_weight >= 0 and lecam_decay in [0, 1), got {lecam_weight}, {lecam_decay}")
        self.adaptive = bool(adaptive) and bool(self.policy)
        self.ada_target, self.ada_images, self.ada_interval = float(ada_target), int(ada_images), int(ada_interval)
        self.lecam_weight, self.lecam_decay = float(lecam_weight), float(lecam_decay)
        self.translation, self.cutout = float(translation), float(cutout)
        self.register_buffer("p", torch.tensor(float(p)))
        self.register_buffer("ada_sum", torch.zeros((), dtype=torch.float64))  # sum of signs
        self.register_buffer("ada_count", torch.zeros((), dtype=torch.float64))  # outputs counted
        self.register_buffer("ada_seen", torch.zeros((), dtype=torch.float64))  # real images counted
        self.register_buffer("ada_updates", torch.zeros((), dtype=torch.long))  # D updates observed
        self.register_buffer("rt", torch.zeros(()))  # the last r_t
        self.register_buffer("anchor_real", torch.zeros(()))
        self.register_buffer("anchor_fake", torch.zeros(()))
        self.last_lecam = 0.0

    @property
    def augments(self) -> bool:
        """True when D's inputs are augmented."""
        return bool(self.policy)

    @property
    def active(self) -> bool:
        """True when it changes anything (augmentation or LeCam)."""
        return self.augments or self.lecam_weight > 0

    def augment(self, x: Tensor, *, generator: torch.Generator) -> Tensor:
        """``diff_augment(x)`` with this regulariser's policy and current ``p``."""
        if not self.policy:
            return x
        return diff_augment(
            x, self.policy, p=self.p, generator=generator, translation=self.translation, cutout=self.cutout
        )

    @torch.no_grad()
    def observe(self, kind: str, real_logits: Tensor, fake_logits: Sequence[Tensor], n_images: int) -> None:
        """Feed one D update's outputs to ADA (adjusting ``p`` every ``ada_interval`` updates)."""
        if not self.adaptive:
            return
        real = real_logits.detach().float()
        if kind == "lsgan":
            centre = real.new_tensor(0.5)
        elif kind == "wgan":
            centre = torch.cat([f.detach().float().flatten() for f in fake_logits]).mean()
        else:
            centre = real.new_tensor(0.0)
        self.ada_sum += torch.sign(real - centre).sum().double()
        self.ada_count += real.numel()
        self.ada_seen += n_images
        self.ada_updates += 1
        if int(self.ada_updates) % self.ada_interval == 0:
            rt = self.ada_sum / self.ada_count.clamp_min(1)
            self.rt.fill_(float(rt))
            step = torch.sign(rt - self.ada_target) * self.ada_seen / self.ada_images
            self.p.copy_((self.p.double() + step).clamp(0.0, 1.0).to(self.p.dtype))
            self.ada_sum.zero_()
            self.ada_count.zero_()
            self.ada_seen.zero_()

    def penalty(self, real_logits: Tensor, fake_logits: Sequence[Tensor]) -> Tensor:
        """``lecam_weight`` * LeCam penalty, after updating the anchors with this batch (0 when off)."""
        if self.lecam_weight <= 0:
            return real_logits.new_zeros((), dtype=torch.float32)
        fake = torch.cat([f.float().flatten() for f in fake_logits])
        with torch.no_grad():
            d = self.lecam_decay
            self.anchor_real.mul_(d).add_((1 - d) * real_logits.detach().float().mean())
            self.anchor_fake.mul_(d).add_((1 - d) * fake.detach().mean())
        pen = lecam_penalty(real_logits.flatten(), fake, self.anchor_real, self.anchor_fake)
        self.last_lecam = float(pen.detach())
        return self.lecam_weight * pen

    def logs(self) -> dict[str, float]:
        """Floats for the metrics: ``aug_p`` (and ``ada_rt``) when augmenting, ``lecam`` when on."""
        out: dict[str, float] = {}
        if self.augments:
            out["aug_p"] = float(self.p)
            if self.adaptive:
                out["ada_rt"] = float(self.rt)
        if self.lecam_weight > 0:
            out["lecam"] = self.last_lecam
        return out


def make_regulariser(
    *,
    diffaug: str | Sequence[str] | None = None,
    diffaug_p: float = 1.0,
    diffaug_adaptive: bool = False,
    ada_target: float = 0.6,
    ada_images: int = 20000,
    lecam_weight: float = 0.0,
    lecam_decay: float = 0.99,
) -> DiscriminatorRegulariser | None:
    """A :class:`DiscriminatorRegulariser` from the config keys every family shares, or None when
    it would change nothing (so families without the options keep their checkpoints' keys)."""
    reg = DiscriminatorRegulariser(
        policy=diffaug,
        p=diffaug_p,
        adaptive=diffaug_adaptive,
        ada_target=ada_target,
        ada_images=ada_images,
        lecam_weight=lecam_weight,
        lecam_decay=lecam_decay,
    )
    return reg if reg.active else None


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


def d_loss(
    kind: str,
    real_logits: Tensor,
    fake_logits: Tensor | Sequence[Tensor],
    *,
    upcast: bool = True,
    reg: DiscriminatorRegulariser | None = None,
) -> Tensor:
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
        reg: the discriminator's regulariser: adds its LeCam term (``lecam_weight`` times
            :func:`lecam_penalty`, anchors updated) and feeds its ADA signal.  Call it once per D update.

    Returns:
        Scalar loss: ``real + fake`` terms (``0.5 (real + fake)`` for lsgan, ``fake - real`` for wgan),
        plus the LeCam term with ``reg``.
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
        loss = fake - _real_term(kind, real)
    else:
        real_term = _real_term(kind, real)
        loss = 0.5 * (real_term + fake_term()) if kind == "lsgan" else real_term + fake_term()
    if reg is not None:
        reg.observe(kind, real_logits, fakes, n_images=real_logits.shape[0])
        if reg.lecam_weight > 0:
            loss = loss + reg.penalty(real_logits, fakes).to(loss.dtype)
    return loss


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
    "AUG_OPS",
    "DiscriminatorRegulariser",
    "KINDS",
    "check_kind",
    "d_loss",
    "diff_augment",
    "discriminate",
    "frozen",
    "g_loss",
    "gradient_penalty",
    "lecam_penalty",
    "make_regulariser",
    "parse_policy",
    "r1_penalty",
    "rand",
    "randn",
    "randperm",
]
