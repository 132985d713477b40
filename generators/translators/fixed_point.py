"""Fixed-Point GAN (Siddiquee et al., ICCV 2019), written from the paper's Eq. 1-7.

``x``: images in [-1, 1], B x 1 x H x W; ``y`` / targets: multi-hot float B x C over ``classes``
(all zeros = ``No Finding``).  One generator ``G(x, c)`` translates any image to the target domain
``c``; the discriminator has a real/fake head and a domain-classification head.

Training (per batch, source domain ``c_x`` = the labels, target ``c_y`` sampled per batch):

- Eq. 1, revised adversarial loss over the cross-domain ``G(x, c_y)`` *and* same-domain ``G(x, c_x)``
  translations (WGAN-GP by default, the critic used by StarGAN and Fixed-Point GAN).
- Eq. 2, domain classification of real images for D; Eq. 3, of both translations for G.
- Eq. 4, cycle consistency ``G(G(x, c), c_x) ~ x`` for ``c`` in {c_y, c_x}.
- Eq. 5, conditional identity ``G(x, c_x) ~ x`` (same domain only).
- Eq. 6 ``L_D = -L_adv + lambda_domain L_domain^r`` (+ gradient penalty), Eq. 7
  ``L_G = L_adv + lambda_domain L_domain^f + lambda_cyc L_cyc + lambda_id L_id``.

``use_identity=False`` drops every same-domain term (Tab. 1's additions), which is StarGAN: adversarial
and domain losses on ``G(x, c_y)`` only, the cross-domain cycle only, no identity loss.

Two recipes (``configs/translator/fixed_point.yaml``): the paper's WGAN-GP with 5 critic steps per
generator step (``adv="wgan"``, ``lambda_gp=10``, ``n_critic=5``: G gets one update in five steps),
and a non-saturating loss with R1 on real images and one critic step per generator step
(``adv="bce"``, ``lambda_gp=0``, ``lambda_r1>0``, ``n_critic=1``: G updated every step).

Inference ("virtual healing"): ``translate(x, zeros)`` for any input, healthy or not; the difference map
``x - G(x, 0)`` localises the findings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from generators.base import Translation
from generators.adversarial import (
    check_kind,
    d_loss,
    discriminate,
    frozen,
    g_loss,
    gradient_penalty,
    make_regulariser,
    r1_penalty,
)
from generators.translators.common import clean_labels, sample_targets, step_optimizer, translation_grid
from generators.translators.losses import domain_loss, l1
from generators.translators.nets import PatchDiscriminator, ResidualGenerator, check_bottleneck


def identity_loss(x: Tensor, same_domain: Tensor) -> Tensor:
    """Eq. 5, conditional identity: ``||G(x, c_x) - x||_1`` (mean over pixels) for the same-domain output."""
    return l1(same_domain, x)


def cycle_loss(x: Tensor, reconstructions: Sequence[Tensor]) -> Tensor:
    """Eq. 4: sum over the translations ``c`` of ``||G(G(x, c), c_x) - x||_1`` (mean over pixels each)."""
    if not reconstructions:
        raise ValueError("need at least one reconstruction")
    return torch.stack([l1(r, x) for r in reconstructions]).sum()


class FixedPointGAN(nn.Module):
    """Fixed-Point GAN system: ``G`` (translator), ``D`` (critic + domain classifier).

    Args:
        classes: finding names, the columns of ``y`` and of targets.
        image_size: side length in pixels (a power of two).
        in_chans: image channels.
        g_width: generator stem width.
        d_width: discriminator first-layer width.
        n_down: generator down-samplings.
        n_res: generator bottleneck residual blocks.
        d_layers: discriminator down-samplings (default ``log2(image_size) - 2``, at most 6).
        skips: U-Net skips in G (off by default: StarGAN's generator has none).
        adv: adversarial kind (``generators.adversarial``): ``"wgan"`` (default), ``"bce"``, ``"lsgan"``
            or ``"hinge"``.
        lambda_domain: weight of the domain-classification losses (Eq. 6, 7).
        lambda_cyc: weight of the cycle loss.
        lambda_id: weight of the conditional identity loss.
        lambda_gp: gradient-penalty weight (0 disables it).
        lambda_r1: R1 penalty weight on real images (Mescheder et al. 2018; 0 disables it); the
            R1 recipe pairs it with ``adv="bce"``, ``lambda_gp=0`` and ``n_critic=1``.
        n_critic: G is updated on steps where ``step % n_critic == 0``; D on every step.
        use_identity: fixed-point learning (same-domain terms); ``False`` gives StarGAN.
        p_healthy: probability that a sampled target is ``No Finding``; the other targets are other
            images' labels from the batch.
        lr_g: generator Adam learning rate.
        lr_d: discriminator Adam learning rate.
        betas: Adam betas.
        spectral_norm: spectral norm on every layer of D.
        fewshot: keyword arguments of :func:`generators.adversarial.make_regulariser` (``diffaug``,
            ``diffaug_p``, ``diffaug_adaptive``, ``ada_target``, ``ada_images``, ``lecam_weight``,
            ``lecam_decay``; the family YAML's ``fewshot:`` mapping); None or {} = off:
            differentiable augmentation of every D input and LeCam
            (:func:`generators.adversarial.make_regulariser`); off by default.  The domain head sees
            the augmented reals too, so a policy with ``cutout`` can hide a finding from it.
    """

    kind = "translator"
    conditional = True  # translate(x, target) takes the target classes
    adds_no_finding = False

    def __init__(
        self,
        *,
        classes: Sequence[str],
        image_size: int,
        in_chans: int = 1,
        g_width: int = 64,
        d_width: int = 64,
        n_down: int = 2,
        n_res: int = 6,
        d_layers: int | None = None,
        skips: bool = False,
        adv: str = "wgan",
        lambda_domain: float = 1.0,
        lambda_cyc: float = 10.0,
        lambda_id: float = 10.0,
        lambda_gp: float = 10.0,
        lambda_r1: float = 0.0,
        n_critic: int = 5,
        use_identity: bool = True,
        p_healthy: float = 0.5,
        lr_g: float = 1e-4,
        lr_d: float = 1e-4,
        betas: Sequence[float] = (0.5, 0.999),
        spectral_norm: bool = False,
        fewshot: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("classes must name at least one finding")
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        if not 0.0 <= p_healthy <= 1.0:
            raise ValueError(f"p_healthy must be in [0, 1], got {p_healthy}")
        check_bottleneck(image_size, n_down)
        adv = check_kind(adv)
        self.classes = list(classes)
        self.image_size = image_size
        self.adv = adv
        self.lambda_domain = lambda_domain
        self.lambda_cyc = lambda_cyc
        self.lambda_id = lambda_id
        self.lambda_gp = lambda_gp
        if lambda_r1 < 0:
            raise ValueError(f"lambda_r1 must be >= 0, got {lambda_r1}")
        self.lambda_r1 = lambda_r1
        self.n_critic = n_critic
        self.use_identity = use_identity
        self.p_healthy = p_healthy
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, (float(betas[0]), float(betas[1]))
        n = len(self.classes)
        self.G = ResidualGenerator(
            n_classes=n, in_chans=in_chans, width=g_width, n_down=n_down, n_res=n_res, skips=skips
        )
        self.D = PatchDiscriminator(
            image_size=image_size,
            in_chans=in_chans,
            width=d_width,
            n_layers=d_layers,
            n_classes=n,
            spectral_norm=spectral_norm,
        )
        self.reg = make_regulariser(**dict(fewshot or {}))
        self._gen: torch.Generator | None = None  # the step's generator, for the augmentation draws

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for ``G`` and ``D``."""
        return {
            "G": torch.optim.Adam(self.G.parameters(), lr=self.lr_g, betas=self.betas),
            "D": torch.optim.Adam(self.D.parameters(), lr=self.lr_d, betas=self.betas),
        }

    def _d(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return discriminate(self.D, z, reg=self.reg, generator=self._gen)

    def _critic(self, z: Tensor) -> Tensor:
        return self._d(z)[0]

    def discriminator_loss(
        self, x: Tensor, c_x: Tensor, fakes: Sequence[Tensor], *, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """Eq. 6 (+ gradient penalty, + R1) on real ``x`` and the (detached) translations ``fakes``."""
        self._gen = generator
        x_in = x.detach().requires_grad_(True) if self.lambda_r1 > 0 else x
        real_adv, real_cls = self._d(x_in)
        fake_adv = [self._d(f.detach())[0] for f in fakes]
        adv = d_loss(self.adv, real_adv, fake_adv, upcast=False, reg=self.reg)
        dom = domain_loss(real_cls, c_x)
        loss = adv + self.lambda_domain * dom
        logs = {"d_adv": adv.item(), "d_domain": dom.item()}
        if self.lambda_r1 > 0:
            r1 = r1_penalty(real_adv.float(), x_in)
            loss = loss + self.lambda_r1 * r1
            logs["d_r1"] = r1.item()
        if self.lambda_gp > 0:
            fake = torch.cat([f.detach() for f in fakes])
            real = x.repeat(len(fakes), 1, 1, 1)
            gp = gradient_penalty(self._critic, real, fake, generator=generator)
            loss = loss + self.lambda_gp * gp
            logs["d_gp"] = gp.item()
        logs["d_loss"] = loss.item()
        return loss, logs

    def generator_terms(self, x: Tensor, c_x: Tensor, c_y: Tensor) -> dict[str, Tensor]:
        """Unweighted Eq. 7 terms ``g_adv``, ``g_domain``, ``g_cyc``, ``g_id`` (0 for StarGAN)."""
        fake_y = self.G(x, c_y)
        adv_y, cls_y = self._d(fake_y)
        adv = g_loss(self.adv, adv_y, upcast=False)
        dom = domain_loss(cls_y, c_y)
        recs = [self.G(fake_y, c_x)]
        ident = x.new_zeros(())
        if self.use_identity:
            fake_x = self.G(x, c_x)
            adv_x, cls_x = self._d(fake_x)
            adv = adv + g_loss(self.adv, adv_x, upcast=False)
            dom = dom + domain_loss(cls_x, c_x)
            recs.append(self.G(fake_x, c_x))
            ident = identity_loss(x, fake_x)
        return {"g_adv": adv, "g_domain": dom, "g_cyc": cycle_loss(x, recs), "g_id": ident}

    def generator_weights(self) -> dict[str, float]:
        """Eq. 7 weights of the ``generator_terms``."""
        return {
            "g_adv": 1.0,
            "g_domain": self.lambda_domain,
            "g_cyc": self.lambda_cyc,
            "g_id": self.lambda_id if self.use_identity else 0.0,
        }

    def generator_loss(self, x: Tensor, c_x: Tensor, c_y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Eq. 7 for source domains ``c_x`` and targets ``c_y``."""
        terms = self.generator_terms(x, c_x, c_y)
        weights = self.generator_weights()
        loss = sum(weights[k] * v for k, v in terms.items())
        logs = {k: v.item() for k, v in terms.items()}
        logs["g_loss"] = loss.item()
        return loss, logs

    def training_step(
        self,
        batch: dict[str, Tensor],
        opts: dict[str, torch.optim.Optimizer],
        *,
        step: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """One D update, and one G update on steps where ``step % n_critic == 0``."""
        x = batch["x"]
        self._gen = generator
        c_x = clean_labels(batch["y"]).to(x.device)
        c_y = sample_targets(c_x, generator=generator, p_healthy=self.p_healthy)
        with torch.no_grad():
            fakes = [self.G(x, c_y)]
            if self.use_identity:
                fakes.append(self.G(x, c_x))
        loss_d, logs = self.discriminator_loss(x, c_x, fakes, generator=generator)
        step_optimizer(opts["D"], loss_d)
        if step % self.n_critic == 0:
            with frozen(self.D):
                loss_g, g_logs = self.generator_loss(x, c_x, c_y)
                step_optimizer(opts["G"], loss_g)
            logs.update(g_logs)
        if self.reg is not None:
            logs.update(self.reg.logs())
        self._gen = None
        return logs

    @torch.no_grad()
    def translate(self, x: Tensor, target: Tensor) -> Translation:
        """``G(x, target)``; ``target`` all zeros heals any input."""
        target = clean_labels(target).to(x.device)
        image = self.G(x, target)
        return Translation(image=image, diff_map=x - image, mask=None)

    @torch.no_grad()
    def sample_grid(self, batch: dict[str, Tensor]) -> Tensor:
        """Rows input / healed / difference, 24 x 1 x H x W, 8 per row (see ``translation_grid``)."""
        x = batch["x"]
        healed = self.translate(x, x.new_zeros(x.shape[0], len(self.classes))).image
        return translation_grid(x, healed)
