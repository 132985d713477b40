"""Branched GANs with additive class distinction maps (Kadar, Brokman, Gilboa 2023), from Eq. 1-10.

``x``: images in [-1, 1], B x 1 x H x W; labels / targets: multi-hot float B x C over ``classes``
(all zeros = ``No Finding``).

- Eq. 1-3: ``N`` generator branches ``psi_i = G_i(x, s)`` (each ``tanh``-bounded) whose *sum* is the
  image, ``x_hat = psi_1 + sum_{i>=2} psi_i``; ``s`` is a style computed from the class by a mapping
  network (the paper removes StarGAN v2's style encoder).  Branch 1 carries the class distinction.
- Eq. 4, alpha blending: per batch ``alpha ~ U(0, 1)^(N-1)``;
  ``x_hat^a = psi_1^a + sum_i alpha_{i-1} psi_i^a + (1 - alpha_{i-1}) psi_i^b`` for the two classes
  ``a, b`` (the image's own class and the complementary one), which pushes class information out of
  branches 2..N and into branch 1.
- Eq. 5-7: ``L_rec`` (L1 + L2), ``L_grad-rec`` (L_rec of the finite-difference gradients) and
  ``L_dis-rec`` (L_rec restricted to where ``|psi_1| > mean |psi_1|``) on the own-class image.
- Eq. 8: specialisation ``|| sum psi_i^2 - (sum psi_i)^2 ||^2`` (one dominant branch per pixel), with the
  equal-energy regulariser the paper mentions for branches 2..N (no equation given; ours is the squared
  coefficient of variation of their mean energies, ``lambda_energy``).
- Eq. 9: sparsity ``||psi_1||_1``.  Eq. 10: the weighted sum plus the adversarial loss of StarGAN v2
  (non-saturating, multi-task discriminator with one output per domain, R1 on real images).

Losses are means over pixels rather than the paper's sums, so the weights do not depend on image size.

Multi-label generalisation: domain outputs are the C findings plus ``No Finding``; a multi-hot label
selects the mean of its findings' outputs.  The complementary target of an abnormal image is healthy;
of a healthy image, another image's findings (see ``complementary_targets``).

Healthy translation: ``translate(x, 0)`` is the full sum of the branches under the ``No Finding`` style,
``psi_1^healthy + sum_{i>=2} psi_i^healthy`` -- Eq. 4 at ``alpha = 1``, which the paper uses to generate
at inference -- clamped to [-1, 1].  Since branches 2..N are trained to be class-independent, the
difference from the input is carried by branch 1: ``x - translate(x, 0) ~ psi_1^own - psi_1^healthy``.
Branch 1 alone (the paper's class-distinction map) is available from ``decompose(x, c)[:, 0]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from generators.base import Translation
from generators.adversarial import d_loss, discriminate, frozen, g_loss, make_regulariser, r1_penalty, rand
from generators.translators.common import clean_labels, complementary_targets, step_optimizer, translation_grid
from generators.translators.nets import MappingNetwork, PatchDiscriminator, UNetGenerator, check_bottleneck

# -- pure functions -----------------------------------------------------------------------------------


def compose(psi: Tensor) -> Tensor:
    """Eq. 2: the image is the sum of the branches (``psi``: B x N x C x H x W -> B x C x H x W)."""
    return psi.sum(dim=1)


def alpha_blend(psi_own: Tensor, psi_other: Tensor, alpha: Tensor) -> Tensor:
    """Eq. 4: ``psi_1^own + sum_{i>=2} alpha_{i-1} psi_i^own + (1 - alpha_{i-1}) psi_i^other``.

    Args:
        psi_own: branches under the style of the class being generated, B x N x C x H x W.
        psi_other: branches under the other class's style, same shape.
        alpha: N - 1 blending weights in [0, 1].
    """
    n = psi_own.shape[1]
    if alpha.numel() != n - 1:
        raise ValueError(f"alpha needs {n - 1} weights for {n} branches, got {alpha.numel()}")
    a = alpha.to(psi_own.dtype).view(1, n - 1, 1, 1, 1)
    shared = (a * psi_own[:, 1:] + (1.0 - a) * psi_other[:, 1:]).sum(dim=1)
    return psi_own[:, 0] + shared


def rec_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Eq. 5: ``|x - x_hat| + (x - x_hat)^2``, mean over pixels."""
    d = x - x_hat
    return (d.abs() + d.pow(2)).mean()


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward differences along width and height."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def grad_rec_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Eq. 6: ``L_rec`` of the image gradients (both directions summed)."""
    gx, gy = image_gradients(x)
    hx, hy = image_gradients(x_hat)
    return rec_loss(gx, hx) + rec_loss(gy, hy)


def distinction_indicator(psi1: Tensor) -> Tensor:
    """Eq. 7's ``I``: 1 where ``|psi_1|`` exceeds its mean over the image, per image (no gradient)."""
    a = psi1.detach().abs()
    return (a > a.mean(dim=(1, 2, 3), keepdim=True)).to(psi1.dtype)


def dis_rec_loss(x: Tensor, x_hat: Tensor, psi1: Tensor) -> Tensor:
    """Eq. 7: ``L_rec(x * I, x_hat * I) / sum(I)`` (per-pixel L1 + L2 over the pixels where I = 1)."""
    ind = distinction_indicator(psi1)
    d = (x - x_hat) * ind
    total = (d.abs() + d.pow(2)).sum()
    return total / ind.sum().clamp_min(1.0)


def specialisation_loss(psi: Tensor) -> Tensor:
    """Eq. 8: ``(sum_i psi_i^2 - (sum_i psi_i)^2)^2``, mean over pixels; 0 when one branch is non-zero."""
    diff = psi.pow(2).sum(dim=1) - psi.sum(dim=1).pow(2)
    return diff.pow(2).mean()


def energy_balance_loss(psi: Tensor, eps: float = 1e-8) -> Tensor:
    """Equal energies in branches 2..N: squared coefficient of variation of their mean ``psi_i^2``.

    Scale-free, so it does not push the branches to zero; 0 for fewer than two non-class branches.
    """
    if psi.shape[1] < 3:
        return psi.new_zeros(())
    energy = psi[:, 1:].pow(2).mean(dim=(2, 3, 4))  # B x (N-1)
    mean = energy.mean(dim=1)
    var = energy.var(dim=1, unbiased=False)
    return (var / (mean.pow(2) + eps)).mean()


def sparsity_loss(psi1: Tensor) -> Tensor:
    """Eq. 9: ``||psi_1||_1``, mean over pixels."""
    return psi1.abs().mean()


def select_domain(adv: Tensor, c: Tensor) -> Tensor:
    """Multi-task discriminator output for each image's domain.

    Args:
        adv: logits B x (C + 1) x h x w: one map per finding, the last for ``No Finding``.
        c: multi-hot B x C; the selected logit is the mean over the image's findings, or the
            ``No Finding`` output when it has none.
    """
    healthy = (c.sum(dim=1, keepdim=True) == 0).to(adv.dtype)
    w = torch.cat([c.to(adv.dtype), healthy], dim=1)
    w = w / w.sum(dim=1, keepdim=True)
    return (adv * w[:, :, None, None]).sum(dim=1)


# -- networks -----------------------------------------------------------------------------------------


class BranchedGenerator(nn.Module):
    """Mapping network (class -> style) and ``N`` U-Net branches conditioned on the style.

    ``forward(x, c)`` returns the branch outputs ``psi``, B x N x C x H x W, each in [-1, 1].
    """

    def __init__(
        self,
        *,
        n_classes: int,
        n_branches: int,
        style_dim: int = 16,
        in_chans: int = 1,
        width: int = 32,
        n_down: int = 2,
        n_res: int = 2,
        max_width: int = 256,
        skips: bool = True,
    ) -> None:
        super().__init__()
        if n_branches < 1:
            raise ValueError(f"n_branches must be >= 1, got {n_branches}")
        self.mapping = MappingNetwork(n_classes=n_classes, style_dim=style_dim)
        self.branches = nn.ModuleList(
            UNetGenerator(
                cond_dim=style_dim,
                in_chans=in_chans,
                out_chans=in_chans,
                width=width,
                n_down=n_down,
                n_res=n_res,
                max_width=max_width,
                skips=skips,
            )
            for _ in range(n_branches)
        )

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """Branches ``psi_i = tanh(G_i(x, M(c)))`` stacked on dim 1."""
        s = self.mapping(c.to(x.dtype))
        return torch.stack([torch.tanh(b(x, s)) for b in self.branches], dim=1)


class BranchedGAN(nn.Module):
    """Branched-GAN system: ``G`` (mapping + branches) and ``D`` (multi-task critic).

    Args:
        classes: finding names, the columns of ``y`` and of targets.
        image_size: side length (a power of two).
        n_branches: number of branches N (the paper's ablation: 1, 2, 5).
        in_chans: image channels.
        style_dim: style vector length.
        g_width: each branch's stem width.
        d_width: discriminator first-layer width.
        n_down: branch down-samplings.
        n_res: branch bottleneck residual blocks.
        d_layers: discriminator down-samplings (default ``log2(image_size) - 2``, at most 6).
        skips: U-Net skips in the branches (the paper adds them).
        lambda_rec, lambda_grad_rec, lambda_dis_rec, lambda_sqr, lambda_sparse, lambda_adv: Eq. 10.
            The paper gives no values; the defaults are ours.
        lambda_energy: equal-energy regulariser for branches 2..N.
        lambda_r1: R1 penalty on real images for D.
        lr_g: generator Adam learning rate.
        lr_d: discriminator Adam learning rate.
        betas: Adam betas.
        spectral_norm: spectral norm on every layer of D.
        fewshot: keyword arguments of :func:`generators.adversarial.make_regulariser` (``diffaug``,
            ``diffaug_p``, ``diffaug_adaptive``, ``ada_target``, ``ada_images``, ``lecam_weight``,
            ``lecam_decay``; the family YAML's ``fewshot:`` mapping); None or {} = off:
            differentiable augmentation of every D input and LeCam on the selected-domain outputs
            (:func:`generators.adversarial.make_regulariser`); off by default.
    """

    kind = "translator"
    conditional = True  # translate(x, target) takes the target classes
    adds_no_finding = False

    def __init__(
        self,
        *,
        classes: Sequence[str],
        image_size: int,
        n_branches: int = 5,
        in_chans: int = 1,
        style_dim: int = 16,
        g_width: int = 32,
        d_width: int = 64,
        n_down: int = 2,
        n_res: int = 2,
        d_layers: int | None = None,
        skips: bool = True,
        lambda_rec: float = 10.0,
        lambda_grad_rec: float = 5.0,
        lambda_dis_rec: float = 5.0,
        lambda_sqr: float = 1.0,
        lambda_sparse: float = 1.0,
        lambda_adv: float = 1.0,
        lambda_energy: float = 0.1,
        lambda_r1: float = 1.0,
        lr_g: float = 1e-4,
        lr_d: float = 1e-4,
        betas: Sequence[float] = (0.0, 0.99),
        spectral_norm: bool = False,
        fewshot: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("classes must name at least one finding")
        check_bottleneck(image_size, n_down)
        self.classes = list(classes)
        self.image_size = image_size
        self.n_branches = n_branches
        self.lambda_rec = lambda_rec
        self.lambda_grad_rec = lambda_grad_rec
        self.lambda_dis_rec = lambda_dis_rec
        self.lambda_sqr = lambda_sqr
        self.lambda_sparse = lambda_sparse
        self.lambda_adv = lambda_adv
        self.lambda_energy = lambda_energy
        self.lambda_r1 = lambda_r1
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, (float(betas[0]), float(betas[1]))
        n = len(self.classes)
        self.G = BranchedGenerator(
            n_classes=n,
            n_branches=n_branches,
            style_dim=style_dim,
            in_chans=in_chans,
            width=g_width,
            n_down=n_down,
            n_res=n_res,
            skips=skips,
        )
        self.D = PatchDiscriminator(
            image_size=image_size,
            in_chans=in_chans,
            width=d_width,
            n_layers=d_layers,
            n_adv=n + 1,
            spectral_norm=spectral_norm,
        )
        self.reg = make_regulariser(**dict(fewshot or {}))
        self._gen: torch.Generator | None = None  # the step's generator, for the augmentation draws

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for ``G`` (mapping + branches) and ``D``."""
        return {
            "G": torch.optim.Adam(self.G.parameters(), lr=self.lr_g, betas=self.betas),
            "D": torch.optim.Adam(self.D.parameters(), lr=self.lr_d, betas=self.betas),
        }

    def _logit(self, z: Tensor, c: Tensor) -> Tensor:
        return select_domain(discriminate(self.D, z, reg=self.reg, generator=self._gen)[0], c)

    def blended(
        self, x: Tensor, c_own: Tensor, c_other: Tensor, alpha: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(psi_own, psi_other, x_hat_own, x_hat_other)`` by Eq. 4.

        Both styles go through the branches in one batch (instance norm keeps images independent).
        """
        psi_own, psi_other = self.G(torch.cat([x, x]), torch.cat([c_own, c_other])).chunk(2)
        return psi_own, psi_other, alpha_blend(psi_own, psi_other, alpha), alpha_blend(psi_other, psi_own, alpha)

    def discriminator_loss(
        self, x: Tensor, c_x: Tensor, fakes: Sequence[tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, dict[str, float]]:
        """Non-saturating loss on real ``x`` (own domain) vs ``fakes`` ((image, domain) pairs) + R1."""
        x_req = x.detach().requires_grad_(True)
        real = self._logit(x_req, c_x)
        fake = [self._logit(f.detach(), c) for f, c in fakes]
        adv = d_loss("bce", real, fake, upcast=False, reg=self.reg)
        r1 = r1_penalty(real, x_req)
        loss = adv + self.lambda_r1 * r1
        return loss, {"d_adv": adv.item(), "d_r1": r1.item(), "d_loss": loss.item()}

    def generator_terms(
        self,
        x: Tensor,
        c_x: Tensor,
        c_t: Tensor,
        alpha: Tensor,
        blended: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted Eq. 10 terms for inputs ``x`` (labels ``c_x``), complementary targets ``c_t`` and
        blend ``alpha``; structural terms are summed over both styles.  ``blended``: the output of
        :meth:`blended` for these arguments when already computed (with gradients)."""
        psi_x, psi_t, x_own, x_st = blended if blended is not None else self.blended(x, c_x, c_t, alpha)
        return {
            "g_rec": rec_loss(x, x_own),
            "g_grad_rec": grad_rec_loss(x, x_own),
            "g_dis_rec": dis_rec_loss(x, x_own, psi_x[:, 0]),
            "g_sqr": specialisation_loss(psi_x) + specialisation_loss(psi_t),
            "g_energy": energy_balance_loss(psi_x) + energy_balance_loss(psi_t),
            "g_sparse": sparsity_loss(psi_x[:, 0]) + sparsity_loss(psi_t[:, 0]),
            "g_adv": g_loss("bce", self._logit(x_own, c_x), upcast=False)
            + g_loss("bce", self._logit(x_st, c_t), upcast=False),
        }

    def generator_weights(self) -> dict[str, float]:
        """Eq. 10 weights of the ``generator_terms``."""
        return {
            "g_rec": self.lambda_rec,
            "g_grad_rec": self.lambda_grad_rec,
            "g_dis_rec": self.lambda_dis_rec,
            "g_sqr": self.lambda_sqr,
            "g_energy": self.lambda_energy,
            "g_sparse": self.lambda_sparse,
            "g_adv": self.lambda_adv,
        }

    def generator_loss(
        self,
        x: Tensor,
        c_x: Tensor,
        c_t: Tensor,
        alpha: Tensor,
        blended: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Eq. 10, weighted."""
        terms = self.generator_terms(x, c_x, c_t, alpha, blended)
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
        """One D update and one G update with a fresh ``alpha`` and complementary targets.

        The branches run once per step: D learns from the detached fakes, then G's loss reuses the same
        forward pass (G has not changed in between) against the updated D.
        """
        x = batch["x"]
        self._gen = generator
        c_x = clean_labels(batch["y"]).to(x.device)
        c_t = complementary_targets(c_x, generator=generator)
        alpha = rand((self.n_branches - 1,), generator=generator, device=x.device, dtype=x.dtype)
        blended = self.blended(x, c_x, c_t, alpha)
        _, _, x_own, x_st = blended
        loss_d, logs = self.discriminator_loss(x, c_x, [(x_own, c_x), (x_st, c_t)])
        step_optimizer(opts["D"], loss_d)
        with frozen(self.D):
            loss_g, g_logs = self.generator_loss(x, c_x, c_t, alpha, blended)
            step_optimizer(opts["G"], loss_g)
        logs.update(g_logs)
        if self.reg is not None:
            logs.update(self.reg.logs())
        self._gen = None
        return logs

    # -- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def decompose(self, x: Tensor, c: Tensor) -> Tensor:
        """Branch outputs ``psi`` (B x N x C x H x W) under the style of ``c``; ``psi[:, 0]`` is the
        class-distinction map."""
        return self.G(x, clean_labels(c).to(x.device))

    @torch.no_grad()
    def reconstruct(self, x: Tensor, c: Tensor) -> Tensor:
        """The unclamped sum of the branches under ``c``'s style (Eq. 2)."""
        return compose(self.decompose(x, c))

    @torch.no_grad()
    def translate(self, x: Tensor, target: Tensor) -> Translation:
        """Sum of all branches under the target style, clamped to [-1, 1]; ``target`` 0 = healthy."""
        image = self.reconstruct(x, target).clamp(-1.0, 1.0)
        return Translation(image=image, diff_map=x - image, mask=None)

    @torch.no_grad()
    def sample_grid(self, batch: dict[str, Tensor]) -> Tensor:
        """Rows input / healed / difference, 24 x 1 x H x W, 8 per row (see ``translation_grid``)."""
        x = batch["x"]
        healed = self.translate(x, x.new_zeros(x.shape[0], len(self.classes))).image
        return translation_grid(x, healed)
