"""TagGAN (arXiv 2502.17836), written from the paper's summary (Eq. 1, 4, 5).

``x``: images in [-1, 1], B x 1 x H x W; labels / targets: multi-hot float B x C over ``classes``
(all zeros = ``No Finding``).

- Forward generator ``G_{A->M}`` (``self.G``): the disease map ``M(x, c)``, where ``c`` is the multi-hot set
  of findings to remove.  Eq. 1: the synthesised normal is ``y = x - M(x, c)``, exactly.
- ``D_Normal`` judges ``y`` against real normal images (the batch's normals, topped up from a small
  bank of recent normals when a batch has few).
- Backward generator ``G_{N->A}`` (``self.G_back``) regenerates the input from ``y`` and the input's own
  labels; ``D_Abnormal`` (real/fake + domain head) judges the regenerated image against the real
  inputs, so that ``G_{N->A}`` adds the right findings.  Eq. 4: ``L_cyc = ||G_{N->A}(x - M(x, c)) - x||_1``.
- Eq. 5 (our weighting of the summary's full objective):
  ``L_G = lambda_adv_normal L_adv(D_Normal, y) + lambda_adv_abnormal L_adv(D_Abnormal, x_rec)
  + lambda_domain L_domain(D_Abnormal, x_rec, c_x) + lambda_cyc L_cyc``;
  ``L_D`` = the matching discriminator losses (+ ``lambda_domain`` times the domain loss on real inputs).
- ``use_backward_cycle=False`` (the ablation) drops ``G_{N->A}``, ``D_Abnormal`` and ``L_cyc``: the
  forward generator is then trained by ``D_Normal`` alone, the VA-GAN-like setting.

Choice of ``c``: training draws ``c`` as a random superset of the image's own findings (each absent
finding added with probability ``u ~ U(0, 1)`` drawn per image), so both the paper's ``c`` = the image's
label and ``c`` = all findings ("remove whatever is there") are trained, and the result is always a
normal image for ``D_Normal``.  ``translate(x, target)`` therefore removes ``c = 1 - target``: all zeros
(``No Finding``) removes every finding without knowing the source labels.

Partial removal (``partial_removal = p``): ``masks.per_finding_masks`` removes one finding of a
multi-finding image and keeps the others, i.e. asks for ``c = {j} + absent findings``, a set that is not
a superset of the image's findings.  So that this is a trained request, each multi-finding image is,
with probability ``p``, given a partial removal set instead (at least one of its findings removed and at
least one kept, see :func:`removal_sets`).  Its ``y = x - M(x, c)`` must then still show the kept
findings: it is judged by ``D_Abnormal`` (real/fake and the domain head, against the kept set) rather
than ``D_Normal``, and is one more set of fakes for ``D_Abnormal``.  Partial removal needs
``D_Abnormal``, so without the backward cycle it is off (``partial_removal`` property False), and
``per_finding_masks`` refuses multi-finding images for such a model.

The map is bounded so that ``y`` stays in [-1, 1]: with ``t = tanh(raw)``, ``M = t (1 + x)`` for
``t >= 0`` (darkens ``x`` towards -1: removes an added opacity) and ``M = t (1 - x)`` for ``t < 0``
(brightens towards +1: restores e.g. a pneumothorax's missing lung markings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
    rand,
)
from generators.translators.common import clean_labels, step_optimizer, translation_grid
from generators.translators.losses import domain_loss, l1
from generators.translators.nets import PatchDiscriminator, ResidualGenerator, UNetGenerator, check_bottleneck


def bounded_disease_map(x: Tensor, raw: Tensor) -> Tensor:
    """Bounded disease map ``M`` such that ``x - M`` lies in [-1, 1] (see the module docstring)."""
    t = torch.tanh(raw)
    return F.relu(t) * (1.0 + x) - F.relu(-t) * (1.0 - x)


def subtract_map(x: Tensor, m: Tensor) -> Tensor:
    """Eq. 1: ``y = x - M``."""
    return x - m


def cycle_loss(x: Tensor, regenerated: Tensor) -> Tensor:
    """Eq. 4: ``||G_{N->A}(x - M(x, c)) - x||_1`` (mean over pixels)."""
    return l1(regenerated, x)


def removal_targets(c_x: Tensor, *, generator: torch.Generator) -> Tensor:
    """Random superset of each image's findings: absent findings join with probability ``u_i ~ U(0, 1)``."""
    u = rand((c_x.shape[0], 1), generator=generator, device=c_x.device, dtype=c_x.dtype)
    extra = (rand(tuple(c_x.shape), generator=generator, device=c_x.device, dtype=c_x.dtype) < u).to(c_x.dtype)
    return torch.maximum(c_x, extra)


def removal_sets(c_x: Tensor, *, generator: torch.Generator, p_partial: float) -> tuple[Tensor, Tensor]:
    """Removal sets ``c`` for a batch, and the findings each ``y = x - M(x, c)`` should keep.

    Every row first gets :func:`removal_targets` (a superset of its findings: keeps nothing).  Rows
    with at least two findings are then, with probability ``p_partial``, given a partial set instead:
    one random finding of the image is removed for sure and another kept for sure, the others removed
    with probability 1/2; the absent findings drawn by :func:`removal_targets` stay in ``c``.  With
    ``p_partial = 0`` no further draw is made (the old stream).

    Returns:
        ``(c, kept)``, both B x C float in {0, 1}; ``kept`` is all zeros for full removals.
    """
    c_full = removal_targets(c_x, generator=generator)
    kept = torch.zeros_like(c_x)
    if p_partial <= 0:
        return c_full, kept
    b, n = c_x.shape
    present = c_x > 0.5
    sel = (rand((b,), generator=generator, device=c_x.device) < p_partial) & (present.sum(1) >= 2)
    r = rand((b, n), generator=generator, device=c_x.device)
    masked_hi = torch.where(present, r, torch.full_like(r, -1.0))
    masked_lo = torch.where(present, r, torch.full_like(r, 2.0))
    sure_removed = F.one_hot(masked_hi.argmax(1), n).bool()
    sure_kept = F.one_hot(masked_lo.argmin(1), n).bool()
    removed = ((present & (r >= 0.5)) | sure_removed) & ~sure_kept
    keep_rows = present & ~removed
    extras = (c_full > 0.5) & ~present
    c_part = (removed | extras).to(c_x.dtype)
    c = torch.where(sel[:, None], c_part, c_full)
    kept = torch.where(sel[:, None], keep_rows.to(c_x.dtype), kept)
    return c, kept


class DiseaseMapGenerator(nn.Module):
    """``G_{A->M}(x, c)``: a U-Net whose raw output becomes the bounded disease map ``M``."""

    def __init__(
        self,
        *,
        n_classes: int,
        in_chans: int = 1,
        width: int = 64,
        n_down: int = 2,
        n_res: int = 6,
        max_width: int = 256,
        skips: bool = True,
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
        """Disease map ``M(x, c)``, B x C x H x W, with ``x - M`` in [-1, 1]."""
        return bounded_disease_map(x, self.net(x, c))


class TagGAN(nn.Module):
    """TagGAN system: ``G`` (G_{A->M}), ``G_back`` (G_{N->A}), ``D_normal``, ``D_abnormal``.

    Args:
        classes: finding names, the columns of ``y`` and of targets.
        image_size: side length (a power of two).
        in_chans: image channels.
        g_width: generators' stem width.
        d_width: discriminators' first-layer width.
        n_down: generator down-samplings.
        n_res: generator bottleneck residual blocks.
        d_layers: discriminator down-samplings (default ``log2(image_size) - 2``, at most 6).
        skips: U-Net skips in the generators.
        adv: adversarial kind (``generators.adversarial``: ``"lsgan"`` default, ``"bce"``, ``"wgan"``,
            ``"hinge"``).
        lambda_adv_normal: weight of the ``D_Normal`` adversarial term.
        lambda_adv_abnormal: weight of the ``D_Abnormal`` adversarial term.
        lambda_domain: weight of ``D_Abnormal``'s domain classification (real inputs for D, the
            regenerated image for ``G_{N->A}``).
        lambda_cyc: weight of the cycle loss (Eq. 4).
        lambda_gp: gradient penalty on both discriminators (0 = off; use it with ``adv="wgan"``).
        use_backward_cycle: keep the backward GAN and the cycle loss (``False`` = the ablation).
        normal_bank: how many recent real normals to keep for ``D_Normal`` (0 = batch normals only).
        lr_g: generators' Adam learning rate (the paper: 1e-3 at batch size 1).
        lr_d: discriminators' Adam learning rate.
        betas: Adam betas.
        partial_removal: probability that a multi-finding image is trained with a partial removal set
            (see the module docstring; needs the backward cycle).  The config sets 0.5; the code default
            0 keeps models built from older configs honest (they were trained without it, so
            ``per_finding_masks`` refuses their multi-finding images).
        spectral_norm: spectral norm on every layer of both discriminators.
        fewshot: keyword arguments of :func:`generators.adversarial.make_regulariser` (``diffaug``,
            ``diffaug_p``, ``diffaug_adaptive``, ``ada_target``, ``ada_images``, ``lecam_weight``,
            ``lecam_decay``; the family YAML's ``fewshot:`` mapping); None or {} = off:
            differentiable augmentation of every input of both discriminators and LeCam, one
            regulariser (ADA probability, anchors) per discriminator
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
        in_chans: int = 1,
        g_width: int = 64,
        d_width: int = 64,
        n_down: int = 2,
        n_res: int = 6,
        d_layers: int | None = None,
        skips: bool = True,
        adv: str = "lsgan",
        lambda_adv_normal: float = 1.0,
        lambda_adv_abnormal: float = 1.0,
        lambda_domain: float = 1.0,
        lambda_cyc: float = 10.0,
        lambda_gp: float = 0.0,
        use_backward_cycle: bool = True,
        normal_bank: int = 64,
        lr_g: float = 1e-3,
        lr_d: float = 1e-3,
        betas: Sequence[float] = (0.5, 0.999),
        partial_removal: float = 0.0,
        spectral_norm: bool = False,
        fewshot: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not classes:
            raise ValueError("classes must name at least one finding")
        if not 0.0 <= partial_removal <= 1.0:
            raise ValueError(f"partial_removal must be in [0, 1], got {partial_removal}")
        if normal_bank < 0:
            raise ValueError(f"normal_bank must be >= 0, got {normal_bank}")
        check_bottleneck(image_size, n_down)
        adv = check_kind(adv)
        self.classes = list(classes)
        self.image_size = image_size
        self.adv = adv
        self.lambda_adv_normal = lambda_adv_normal
        self.lambda_adv_abnormal = lambda_adv_abnormal
        self.lambda_domain = lambda_domain
        self.lambda_cyc = lambda_cyc
        self.lambda_gp = lambda_gp
        self.use_backward_cycle = use_backward_cycle
        self.p_partial = float(partial_removal) if use_backward_cycle else 0.0
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, (float(betas[0]), float(betas[1]))
        n = len(self.classes)
        gkw = dict(in_chans=in_chans, width=g_width, n_down=n_down, n_res=n_res, skips=skips)
        self.G = DiseaseMapGenerator(n_classes=n, **gkw)
        dkw = dict(
            image_size=image_size, in_chans=in_chans, width=d_width, n_layers=d_layers, spectral_norm=spectral_norm
        )
        self.D_normal = PatchDiscriminator(**dkw)
        rkw = dict(fewshot or {})
        self.reg_normal = make_regulariser(**rkw)
        self.reg_abnormal = None
        if use_backward_cycle:
            self.G_back = ResidualGenerator(n_classes=n, **gkw)
            self.D_abnormal = PatchDiscriminator(n_classes=n, **dkw)
            self.reg_abnormal = make_regulariser(**rkw)
        self._gen: torch.Generator | None = None  # the step's generator, for the augmentation draws
        # Recent real normals, so D_Normal has reals even when a batch has none (not checkpointed).
        bank = torch.zeros(normal_bank, in_chans, image_size, image_size)
        self.register_buffer("normal_bank", bank, persistent=False)
        self._bank_size = 0
        self._bank_next = 0

    @property
    def partial_removal(self) -> bool:
        """Whether removing some findings of a multi-finding image (and keeping others) was trained."""
        return self.p_partial > 0

    # -- networks -------------------------------------------------------------------------------------

    def _dn(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return discriminate(self.D_normal, z, reg=self.reg_normal, generator=self._gen)

    def _da(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        return discriminate(self.D_abnormal, z, reg=self.reg_abnormal, generator=self._gen)

    def _generators(self) -> list[nn.Module]:
        return [self.G, self.G_back] if self.use_backward_cycle else [self.G]

    def _discriminators(self) -> list[nn.Module]:
        return [self.D_normal, self.D_abnormal] if self.use_backward_cycle else [self.D_normal]

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One Adam over both generators (``G``), one over both discriminators (``D``)."""
        g_params = [p for m in self._generators() for p in m.parameters()]
        d_params = [p for m in self._discriminators() for p in m.parameters()]
        return {
            "G": torch.optim.Adam(g_params, lr=self.lr_g, betas=self.betas),
            "D": torch.optim.Adam(d_params, lr=self.lr_d, betas=self.betas),
        }

    def forward_cycle(self, x: Tensor, c: Tensor, c_x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(M, y = x - M, x_rec = G_{N->A}(y, c_x) or None)``."""
        m = self.G(x, c)
        y = subtract_map(x, m)
        x_rec = self.G_back(y, c_x) if self.use_backward_cycle else None
        return m, y, x_rec

    # -- normals for D_Normal -------------------------------------------------------------------------

    def _real_normals(self, x: Tensor, c_x: Tensor) -> Tensor:
        """The batch's normals, topped up to the batch size from the bank, then added to the bank."""
        normals = x[c_x.sum(1) == 0]
        need = x.shape[0] - normals.shape[0]
        if need > 0 and self._bank_size > 0:
            normals = torch.cat([normals, self.normal_bank[: min(need, self._bank_size)].to(x.dtype)])
        cap = self.normal_bank.shape[0]
        for img in x[c_x.sum(1) == 0][:cap].detach():
            self.normal_bank[self._bank_next] = img
            self._bank_next = (self._bank_next + 1) % cap
            self._bank_size = min(self._bank_size + 1, cap)
        return normals

    # -- losses ---------------------------------------------------------------------------------------

    def discriminator_loss(
        self,
        x: Tensor,
        c_x: Tensor,
        normals: Tensor,
        y: Tensor,
        x_rec: Tensor | None,
        *,
        generator: torch.Generator,
        kept: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """D_Normal: ``normals`` real vs the fully healed ``y`` fake; D_Abnormal: ``x`` real (+ domain) vs
        ``x_rec`` and the partially healed ``y`` (rows with a non-empty ``kept``) fake."""
        self._gen = generator
        y = y.detach()
        partial = kept.sum(1) > 0 if kept is not None else torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        y_full, y_part = y[~partial], y[partial]
        loss = x.new_zeros(())
        logs: dict[str, float] = {}
        if normals.shape[0] > 0 and y_full.shape[0] > 0:
            adv_n = d_loss(self.adv, self._dn(normals)[0], [self._dn(y_full)[0]], upcast=False, reg=self.reg_normal)
            loss = loss + adv_n
            logs["d_normal"] = adv_n.item()
            if self.lambda_gp > 0:
                k = min(normals.shape[0], y_full.shape[0])
                gp = gradient_penalty(lambda z: self._dn(z)[0], normals[:k], y_full[:k], generator=generator)
                loss = loss + self.lambda_gp * gp
                logs["d_normal_gp"] = gp.item()
        if x_rec is not None:
            x_rec = x_rec.detach()
            real_adv, real_cls = self._da(x)
            fakes = [self._da(x_rec)[0]]
            if y_part.shape[0] > 0:
                fakes.append(self._da(y_part)[0])
            adv_a = d_loss(self.adv, real_adv, fakes, upcast=False, reg=self.reg_abnormal)
            dom = domain_loss(real_cls, c_x)
            loss = loss + adv_a + self.lambda_domain * dom
            logs["d_abnormal"] = adv_a.item()
            logs["d_domain"] = dom.item()
            if self.lambda_gp > 0:
                gp = gradient_penalty(lambda z: self._da(z)[0], x, x_rec, generator=generator)
                loss = loss + self.lambda_gp * gp
                logs["d_abnormal_gp"] = gp.item()
        logs["d_loss"] = loss.item()
        return loss, logs

    def generator_terms(self, x: Tensor, c_x: Tensor, c: Tensor, kept: Tensor | None = None) -> dict[str, Tensor]:
        """Unweighted Eq. 5 terms for inputs ``x`` with labels ``c_x`` and removal sets ``c``:
        ``g_adv_normal`` and, with the backward cycle, ``g_adv_abnormal``, ``g_domain``, ``g_cyc``; with
        partial removals (rows of ``kept`` not all zero) also ``g_partial_adv`` and ``g_partial_domain``:
        ``D_Abnormal`` judges those ``y`` and its domain head should find the kept findings."""
        _, y, x_rec = self.forward_cycle(x, c, c_x)
        partial = kept.sum(1) > 0 if kept is not None else torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        terms: dict[str, Tensor] = {}
        if bool((~partial).any()):
            terms["g_adv_normal"] = g_loss(self.adv, self._dn(y[~partial])[0], upcast=False)
        else:
            terms["g_adv_normal"] = y.new_zeros(())
        if x_rec is not None:
            adv, cls = self._da(x_rec)
            terms["g_adv_abnormal"] = g_loss(self.adv, adv, upcast=False)
            terms["g_domain"] = domain_loss(cls, c_x)
            terms["g_cyc"] = cycle_loss(x, x_rec)
            if bool(partial.any()):
                adv_p, cls_p = self._da(y[partial])
                terms["g_partial_adv"] = g_loss(self.adv, adv_p, upcast=False)
                terms["g_partial_domain"] = domain_loss(cls_p, kept[partial])
        return terms

    def generator_weights(self) -> dict[str, float]:
        """Eq. 5 weights of the ``generator_terms``."""
        return {
            "g_adv_normal": self.lambda_adv_normal,
            "g_adv_abnormal": self.lambda_adv_abnormal,
            "g_domain": self.lambda_domain,
            "g_cyc": self.lambda_cyc,
        }

    def partial_weights(self) -> dict[str, float]:
        """Weights of the partial-removal terms (as their full-removal counterparts on ``D_Abnormal``)."""
        return {"g_partial_adv": self.lambda_adv_abnormal, "g_partial_domain": self.lambda_domain}

    def generator_loss(
        self, x: Tensor, c_x: Tensor, c: Tensor, kept: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """Eq. 5, weighted (plus the partial-removal terms)."""
        terms = self.generator_terms(x, c_x, c, kept)
        weights = {**self.generator_weights(), **self.partial_weights()}
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
        """One discriminator update then one generator update."""
        x = batch["x"]
        self._gen = generator
        c_x = clean_labels(batch["y"]).to(x.device)
        c, kept = removal_sets(c_x, generator=generator, p_partial=self.p_partial)
        normals = self._real_normals(x, c_x)
        with torch.no_grad():
            _, y, x_rec = self.forward_cycle(x, c, c_x)
        loss_d, logs = self.discriminator_loss(x, c_x, normals, y, x_rec, generator=generator, kept=kept)
        if loss_d.requires_grad:
            step_optimizer(opts["D"], loss_d)
        # else: without the backward cycle D_Normal is the only critic, and before the first real normal
        # (none in the batch, the bank still empty) it has nothing to compare with: the G step still runs.
        with frozen(*self._discriminators()):
            loss_g, g_logs = self.generator_loss(x, c_x, c, kept)
            step_optimizer(opts["G"], loss_g)
        logs.update(g_logs)
        for name, reg in (("normal", self.reg_normal), ("abnormal", self.reg_abnormal)):
            if reg is not None:
                logs.update({f"{k}_{name}": v for k, v in reg.logs().items()})
        self._gen = None
        return logs

    # -- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def disease_map(self, x: Tensor, target: Tensor) -> Tensor:
        """``M(x, 1 - target)``: the map of every finding not in ``target``."""
        c = 1.0 - clean_labels(target).to(x.device)
        return self.G(x, c)

    @torch.no_grad()
    def translate(self, x: Tensor, target: Tensor) -> Translation:
        """``y = x - M(x, 1 - target)``; ``diff_map = x - y = M`` exactly."""
        m = self.disease_map(x, target)
        image = subtract_map(x, m)
        return Translation(image=image, diff_map=x - image, mask=None)

    @torch.no_grad()
    def sample_grid(self, batch: dict[str, Tensor]) -> Tensor:
        """Rows input / healed / difference, 24 x 1 x H x W, 8 per row (see ``translation_grid``)."""
        x = batch["x"]
        healed = self.translate(x, x.new_zeros(x.shape[0], len(self.classes))).image
        return translation_grid(x, healed)
