"""Unconditional score-guided GAN (UCGAN, XRAY-GAN Sec. 4.2, Eq. 7-11): noise -> chest X-ray.

Conventions: ``x`` images float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x K over ``classes``
(NaN already replaced by 0 by the loop).  ``classes`` are the K outputs of the classifier C, softmaxed
together; the caller includes ``"No Finding"`` as a class of its own so every image has a class.  C's
target on a real image is its multi-hot row normalised to sum 1 (rows that are all zero are skipped).

Three networks train together: a DCGAN generator G and discriminator D, and a classifier C that is
passed in (a timm model in production).  G is regularised by scores computed with C (Eq. 10):

* Inception-Score loss (Eq. 7): ``mean_i KL(p(y|G(z_i)) || p~(y))``, ``p~`` the batch marginal.
  ``alpha`` is negative (-0.25), so minimising ``alpha * L_IS`` *maximises* the KL: confident and
  diverse generations.
* MMD (Eq. 8) between C's class-probability vectors on the real and the generated batch.
* Gram-matrix style loss (Eq. 9) between features of generated and real images.
* The pseudo-label cross entropy (the generated half of ``tau * L_C``): generated images whose top
  class probability is >= ``threshold`` are labelled with that class.

Unlike the reference code, which detaches the generated batch before these terms, every term here keeps
the graph to G, so each one trains G (``score_terms`` exposes them, unweighted, for tests).

Style/content interpretation (Eq. 10): the paper's ``I_hat`` (a "style transferred image") is not
produced by any network it describes; we read ``I_hat = I_g = G(z)``.  Then
``gamma * l_style(I_hat, I_r) + eta * l_style(I_r, I_g) = (gamma + eta) * l_style(G(z), I_r)`` because the
squared Frobenius distance is symmetric, and the content term ``l_content(I_hat, I_g)`` compares G(z)'s
features with themselves: it is identically zero with zero gradient, so it is not computed.

Style features come from ``feature_net`` if given (frozen, kept in eval mode: the stand-in for the
paper's VGG loss network, whose weights cannot be downloaded), else from C itself: timm models through
``forward_intermediates`` (default: the first three feature levels), any other module through forward
hooks on ``style_layers`` (module names; default: its first three ``Conv2d`` layers).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generators.adversarial import d_loss, discriminate, frozen, g_loss, make_regulariser, randn
from generators.nets import DCGANDiscriminator, DCGANGenerator

DEFAULT_STYLE_LEVELS = 3
SCHEDULES = ("constant", "paper")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside the block (batch norm uses and keeps its running statistics), then the
    previous mode of every submodule restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def schedule_updates(schedule: str, step: int, schedule_steps: Sequence[int]) -> tuple[bool, bool]:
    """``(update_d, update_g)`` at ``step`` for an update schedule (``SCHEDULES``).

    ``"constant"``: both every step (1:1).  ``"paper"`` (XRAY-GAN footnote 3): G 3:1 over D for
    ``step < schedule_steps[0]`` (D only on every third step), then the flip, D 3:1 over G until
    ``schedule_steps[1]`` (G only on every third step), then 1:1.  Each step brings a fresh real batch,
    so no update reuses one.
    """
    if schedule == "constant":
        return True, True
    first, second = int(schedule_steps[0]), int(schedule_steps[1])
    if step < first:
        return step % 3 == 0, True
    if step < second:
        return True, (step - first) % 3 == 0
    return True, True


# ----------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors.


def inception_score_loss(logits: Tensor) -> Tensor:
    """Eq. 7: ``mean_i KL(p(y|x_i) || p~(y))`` with ``p~ = mean_i p(y|x_i)`` over the batch.

    Equals ``H(p~) - mean_i H(p(y|x_i))``; it is 0 when all rows are equal and at most ``log K``.
    Computed in log space from logits, in float32.

    Args:
        logits: classifier logits B x K for generated images.

    Returns:
        Scalar (>= 0).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    log_marginal = torch.logsumexp(log_p, dim=0) - torch.log(torch.tensor(float(log_p.shape[0])))
    return (log_p.exp() * (log_p - log_marginal)).sum(dim=1).mean()


def gaussian_kernel(a: Tensor, b: Tensor, sigma: float = 1.0) -> Tensor:
    """``k(a_i, b_j) = exp(-||a_i - b_j||^2 / sigma^2)``; ``sigma = 1`` is the paper's kernel.

    Args:
        a: N x D.
        b: M x D.
        sigma: bandwidth.

    Returns:
        N x M kernel matrix.
    """
    d2 = (a[:, None, :] - b[None, :, :]).pow(2).sum(dim=-1)
    return torch.exp(-d2 / (sigma * sigma))


def mmd_loss(p_real: Tensor, p_fake: Tensor, sigma: float = 1.0) -> Tensor:
    """Eq. 8: unbiased finite-sample estimate of the squared MMD with a Gaussian kernel.

    ``1/(N(N-1)) sum_{i!=i'} k(x_i, x_i') + 1/(M(M-1)) sum_{j!=j'} k(y_j, y_j') - 2 * cross``, where
    ``cross`` is ``1/(N(N-1)) sum_{i!=j} k(x_i, y_j)`` when N == M (Gretton et al. 2012, Lemma 6: the
    i != j cross sum of Eq. 8; an estimate that is exactly 0 for identical batches) and the mean over
    all pairs otherwise.  Eq. 8 divides ordered-pair sums by ``C(N, 2)``, i.e. twice this; the constant
    factor is absorbed in ``beta``.

    Args:
        p_real: N x K class-probability vectors of real images (``X`` in Eq. 8).
        p_fake: M x K class-probability vectors of generated images (``Y``).
        sigma: kernel bandwidth.

    Returns:
        Scalar estimate (can be slightly negative, being unbiased).

    Raises:
        ValueError: when either batch has fewer than 2 rows.
    """
    n, m = p_real.shape[0], p_fake.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per batch, got {n} and {m}")
    x, y = p_real.float(), p_fake.float()
    kxx, kyy, kxy = gaussian_kernel(x, x, sigma), gaussian_kernel(y, y, sigma), gaussian_kernel(x, y, sigma)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    xy = (kxy.sum() - kxy.diagonal().sum()) / (n * (n - 1)) if n == m else kxy.mean()
    return xx + yy - 2.0 * xy


def gram_matrix(features: Tensor) -> Tensor:
    """``G_{c,c'} = phi_c . phi_c' / (C H W)`` per image (Johnson et al. 2016).

    Args:
        features: B x C x H x W feature maps.

    Returns:
        B x C x C, float32.
    """
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def style_loss(features_a: Sequence[Tensor], features_b: Sequence[Tensor]) -> Tensor:
    """Eq. 9 summed over layers: ``sum_j ||mean_b Gram_j(a) - mean_b Gram_j(b)||_F^2``.

    The two batches are unpaired (generated vs real), so each side's Gram matrices are averaged over
    its batch: the loss compares the batches' mean style.

    Args:
        features_a: per-layer feature maps of one batch (e.g. generated images).
        features_b: the same layers for the other batch (e.g. real images).

    Returns:
        Scalar (>= 0).
    """
    if len(features_a) != len(features_b) or not features_a:
        raise ValueError(f"need the same non-zero number of layers, got {len(features_a)} and {len(features_b)}")
    total = features_a[0].new_zeros((), dtype=torch.float32)
    for fa, fb in zip(features_a, features_b):
        total = total + (gram_matrix(fa).mean(0) - gram_matrix(fb).mean(0)).pow(2).sum()
    return total


def classifier_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Cross entropy against the normalised multi-hot target ``y / sum(y)``; all-zero rows are skipped.

    Args:
        logits: B x K.
        y: B x K multi-hot (NaN already 0).

    Returns:
        Mean over labelled rows; 0 (with a graph) when no row is labelled.
    """
    y = y.float()
    mass = y.sum(dim=1)
    keep = mass > 0
    log_p = F.log_softmax(logits.float(), dim=1)
    ce = -(y / mass.clamp_min(1e-12)[:, None] * log_p).sum(dim=1)
    return (ce * keep).sum() / keep.sum().clamp_min(1)


def pseudo_label_mask(logits: Tensor, threshold: float) -> Tensor:
    """Rows whose top softmax probability is >= ``threshold`` (B bools; no gradient)."""
    return F.softmax(logits.detach().float(), dim=1).amax(dim=1) >= threshold


def pseudo_label_loss(logits: Tensor, threshold: float) -> Tensor:
    """Cross entropy of generated images against their own argmax class (Lee 2013), confident rows only.

    Labels and the acceptance mask carry no gradient; the loss does (to C, and through the logits to G).
    Normalised by the whole batch size, so its weight grows with the acceptance rate.

    Args:
        logits: B x K classifier logits on generated images.
        threshold: minimum top-class probability for a row to be used.

    Returns:
        ``sum_{accepted} CE / B``; 0 (with a graph) when nothing is accepted.
    """
    mask = pseudo_label_mask(logits, threshold)
    labels = logits.detach().argmax(dim=1)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (ce * mask).sum() / logits.shape[0]


# ----------------------------------------------------------------------------------------------------
# Feature taps for the style loss.


class _FeatureSource:
    """Intermediate features of a network: timm ``forward_intermediates`` or forward hooks.

    Not an nn.Module (the network is registered on the system); just the rule to read its features.
    """

    def __init__(self, net: nn.Module, layers: Sequence[int] | Sequence[str] | None) -> None:
        self.timm = hasattr(net, "forward_intermediates") and not any(isinstance(v, str) for v in layers or [])
        if self.timm:
            levels = len(getattr(net, "feature_info", [])) or DEFAULT_STYLE_LEVELS
            self.layers: list[int] | list[str] = (
                [int(i) for i in layers] if layers else list(range(min(DEFAULT_STYLE_LEVELS, levels)))
            )
            return
        names = dict(net.named_modules())
        if layers:
            missing = [n for n in layers if n not in names]
            if missing:
                raise ValueError(f"style_layers {missing} not found; modules are: {', '.join(n for n in names if n)}")
            self.layers = [str(n) for n in layers]
        else:
            self.layers = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)][:DEFAULT_STYLE_LEVELS]
            if not self.layers:
                raise ValueError("the feature network has no Conv2d layer; give style_layers (module names)")

    def __call__(self, net: nn.Module, x: Tensor, *, logits: bool) -> tuple[Tensor | None, list[Tensor]]:
        """Run ``net`` on ``x``; return (its logits if ``logits`` else None, the tapped features)."""
        if self.timm:
            if logits:
                final, feats = net.forward_intermediates(x, indices=self.layers)
                return net.forward_head(final), list(feats)
            return None, list(net.forward_intermediates(x, indices=self.layers, intermediates_only=True))
        store: dict[str, Tensor] = {}
        modules = dict(net.named_modules())
        handles = [
            modules[name].register_forward_hook(lambda _m, _i, out, name=name: store.__setitem__(name, out))
            for name in self.layers
        ]
        try:
            out = net(x)
        finally:
            for h in handles:
                h.remove()
        return (out if logits else None), [store[name] for name in self.layers]


# ----------------------------------------------------------------------------------------------------
# The system.


class UCGAN(nn.Module):
    """Score-guided unconditional DCGAN with a jointly trained classifier and pseudo-labels.

    Per step (Eq. 11, one optimiser each): D minimises ``lam * L_D``; C minimises
    ``tau * (CE(C(x), y) + xi * L_pseudo(C(G(z))))``; G minimises
    ``delta * L_G + alpha * L_IS + beta * MMD + (gamma + eta) * L_style + tau * xi * L_pseudo``
    with D and C frozen (their updated weights score G's batch).  ``use_is``/``use_mmd``/``use_style``
    switch the regularisers off for the paper's Table 5 ablation ("simple": all off).

    Args:
        classes: the K classes C predicts (softmax), the order of ``y``'s columns; include "No Finding".
        classifier: C, mapping B x 1 x H x W to B x K logits (a timm model in production).
        image_size: output side, power of two in [32, 256].
        z_dim: noise dimension.
        g_channels: generator width multiplier.
        d_channels: discriminator width multiplier.
        alpha: IS-loss weight (negative: maximise the KL).
        beta: MMD weight.
        gamma: weight of the style term paired with the (vanishing) content term in Eq. 10.
        eta: weight of the extra style term of Eq. 9/10.
        delta: G adversarial weight.
        lam: D loss weight.
        tau: C loss weight.
        xi: weight of pseudo-labelled generated images relative to real ones in C's loss.
        threshold: pseudo-label acceptance threshold on the top class probability.
        lr_g: G learning rate.
        lr_d: D learning rate.
        lr_c: C learning rate.
        weight_decay: Adam L2 weight decay for G, D and C.
        mmd_sigma: Gaussian kernel bandwidth.
        style_layers: int feature levels for timm ``forward_intermediates`` or module names for hooks;
            None picks the defaults described in the module docstring.
        feature_net: a fixed network for the style features (frozen here); None uses C.
        use_is: include the IS loss.
        use_mmd: include the MMD loss.
        use_style: include the style loss.
        betas: Adam betas for the three optimisers.
        max_mult: cap on the width multipliers of G and D.
        schedule: D/G update schedule, ``"constant"`` (1:1, the default) or ``"paper"`` (footnote 3:
            G 3:1 over D, then D 3:1 over G, then 1:1; see :func:`schedule_updates`).  The paper gives no
            phase lengths, so ``schedule_steps`` are ours; the default stays 1:1 until a learning curve
            shows the schedule helps (it removes two thirds of D's or G's updates in its phases).
        schedule_steps: the two step boundaries of the ``"paper"`` schedule.
        balanced: class-balanced batches (overrides the loop's ``balanced``); None: follow the loop.
            The paper trains "without balancing", and then MMD (Eq. 8) compares G's class mix with the
            data's natural one; with balancing, MMD pulls G toward the re-weighted (uniform) mix and the
            rare classes are seen often enough to be learned.  Our config sets ``true`` (rare findings
            are the product's purpose); ``false`` is the paper's setting.
        spectral_norm: spectral norm on every D layer (D then has no batch norm).
        fewshot: keyword arguments of :func:`generators.adversarial.make_regulariser` (``diffaug``,
            ``diffaug_p``, ``diffaug_adaptive``, ``ada_target``, ``ada_images``, ``lecam_weight``,
            ``lecam_decay``; the family YAML's ``fewshot:`` mapping); None or {} = off:
            differentiable augmentation of D's inputs and LeCam
            (:func:`generators.adversarial.make_regulariser`); C's inputs are never augmented.

    C runs in eval mode during G's update: the score terms then use the same (running-statistics)
    probabilities that ``classify`` uses for pseudo-labelling, and G's batches never move C's batch-norm
    statistics (they move only in C's own update, on real and generated images).
    """

    kind = "sampler"
    conditional = False  # sample(n) ignores classes: generated images are pseudo-labelled by C
    adds_no_finding = True  # C's classes are the findings plus "No Finding", which the caller appends

    def __init__(
        self,
        *,
        classes: list[str],
        classifier: nn.Module,
        image_size: int = 64,
        z_dim: int = 128,
        g_channels: int = 64,
        d_channels: int = 64,
        alpha: float = -0.25,
        beta: float = 3.0,
        gamma: float = 0.001,
        eta: float = 0.015,
        delta: float = 1.0,
        lam: float = 0.5,
        tau: float = 1.0,
        xi: float = 0.125,
        threshold: float = 0.75,
        lr_g: float = 5e-4,
        lr_d: float = 1e-3,
        lr_c: float = 5e-4,
        weight_decay: float = 1e-3,
        mmd_sigma: float = 1.0,
        style_layers: list[int] | list[str] | None = None,
        feature_net: nn.Module | None = None,
        use_is: bool = True,
        use_mmd: bool = True,
        use_style: bool = True,
        betas: tuple[float, float] = (0.5, 0.999),
        max_mult: int = 8,
        schedule: str = "constant",
        schedule_steps: Sequence[int] = (1000, 2000),
        balanced: bool | None = None,
        spectral_norm: bool = False,
        fewshot: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown UCGAN schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if len(schedule_steps) != 2 or not 0 <= int(schedule_steps[0]) <= int(schedule_steps[1]):
            raise ValueError(f"schedule_steps must be two increasing steps [a, b], got {list(schedule_steps)}")
        self.schedule, self.schedule_steps = schedule, (int(schedule_steps[0]), int(schedule_steps[1]))
        self.balanced_batches = balanced
        if len(classes) < 2:
            raise ValueError(f"UCGAN's classifier needs at least 2 classes (include 'No Finding'), got {classes}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.classes = list(classes)
        self.image_size = image_size
        self.z_dim = z_dim
        self.alpha, self.beta, self.gamma, self.eta = alpha, beta, gamma, eta
        self.delta, self.lam, self.tau, self.xi = delta, lam, tau, xi
        self.threshold = threshold
        self.lr_g, self.lr_d, self.lr_c = lr_g, lr_d, lr_c
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.mmd_sigma = mmd_sigma
        self.use_is, self.use_mmd, self.use_style = use_is, use_mmd, use_style
        self.G = DCGANGenerator(image_size=image_size, z_dim=z_dim, channels=g_channels, max_mult=max_mult)
        self.D = DCGANDiscriminator(
            image_size=image_size,
            channels=d_channels,
            max_mult=max_mult,
            norm="none" if spectral_norm else "batch",
            spectral_norm=spectral_norm,
        )
        self.reg = make_regulariser(**dict(fewshot or {}))
        self.C = classifier
        self.feature_net = feature_net
        if feature_net is not None:
            feature_net.requires_grad_(False)
            feature_net.eval()
        self._features = _FeatureSource(feature_net if feature_net is not None else classifier, style_layers)

    def train(self, mode: bool = True) -> UCGAN:
        """Set train/eval mode; an injected ``feature_net`` stays in eval mode (it is a fixed loss network)."""
        super().train(mode)
        if self.feature_net is not None:
            self.feature_net.eval()
        return self

    # -- inference -------------------------------------------------------------------------------

    def forward(self, z: Tensor) -> Tensor:
        """``G(z)``: images B x 1 x H x W in [-1, 1]."""
        return self.G(z)

    def sample(self, n: int, y: Tensor | None = None, *, generator: torch.Generator) -> Tensor:
        """Draw ``n`` images (unconditional: ``y`` is ignored; pseudo-label them with ``classify``)."""
        device = next(self.G.parameters()).device
        return self.G(randn((n, self.z_dim), generator=generator, device=device))

    def classify(self, x: Tensor) -> Tensor:
        """C's class probabilities B x K (softmax over ``classes``), for pseudo-labelling generated images."""
        return F.softmax(self._logits(x).float(), dim=1)

    # -- pieces of the step ----------------------------------------------------------------------

    def _logits(self, x: Tensor) -> Tensor:
        logits = self.C(x)
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise ValueError(
                f"classifier must return B x {len(self.classes)} logits (one per class), got {tuple(logits.shape)}"
            )
        return logits

    def _logits_and_features(self, x: Tensor, with_features: bool) -> tuple[Tensor, list[Tensor]]:
        if not with_features:
            return self._logits(x), []
        if self.feature_net is not None:
            return self._logits(x), self._features(self.feature_net, x, logits=False)[1]
        logits, feats = self._features(self.C, x, logits=True)
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise ValueError(
                f"classifier must return B x {len(self.classes)} logits (one per class), got {tuple(logits.shape)}"
            )
        return logits, feats

    def score_terms(self, x_real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """G's unweighted classifier-based terms on a generated batch, each with a graph to ``fake``.

        Args:
            x_real: real images B x 1 x H x W (features and probabilities taken without gradient).
            fake: generated images, NOT detached.

        Returns:
            ``"pseudo"`` always, and ``"is"``, ``"mmd"``, ``"style"`` as enabled by the flags.
        """
        logits_fake, feats_fake = self._logits_and_features(fake, self.use_style)
        terms = {"pseudo": pseudo_label_loss(logits_fake, self.threshold)}
        if self.use_is:
            terms["is"] = inception_score_loss(logits_fake)
        if self.use_mmd or self.use_style:
            with torch.no_grad():
                logits_real, feats_real = self._logits_and_features(x_real, self.use_style)
            if self.use_mmd:
                p_real, p_fake = F.softmax(logits_real.float(), 1), F.softmax(logits_fake.float(), 1)
                terms["mmd"] = mmd_loss(p_real, p_fake, self.mmd_sigma)
            if self.use_style:
                terms["style"] = style_loss(feats_fake, feats_real)
        return terms

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam with L2 weight decay for G (``"g"``), D (``"d"``) and C (``"c"``)."""

        def adam(module: nn.Module, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam(module.parameters(), lr=lr, betas=self.betas, weight_decay=self.weight_decay)

        return {"g": adam(self.G, self.lr_g), "d": adam(self.D, self.lr_d), "c": adam(self.C, self.lr_c)}

    def training_step(
        self,
        batch: dict[str, Tensor],
        opts: dict[str, torch.optim.Optimizer],
        *,
        step: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """D, C and G updates on the same generated batch (Eq. 10-11); D and G as ``schedule`` says.

        Args:
            batch: ``{"x": B x 1 x H x W in [-1, 1], "y": B x K}``.
            opts: ``{"g", "d", "c"}`` from ``configure_optimizers``.
            step: global step (for the ``"paper"`` schedule).
            generator: source of the noise.

        Returns:
            Losses (``loss_d``, ``loss_c``, ``loss_c_fake``, ``loss_g_adv``, ``loss_pseudo``, ``loss_is``,
            ``loss_mmd``, ``loss_style``, ``loss_g``), ``d_real``/``d_fake`` mean logits, ``c_acc_real``
            (top class among the image's labels) and ``acceptance`` (fraction of the generated batch
            whose top probability is >= ``threshold``), ``update_d``/``update_g`` (1 when that network
            was updated this step; its losses are logged only then) and the regulariser's ``aug_p``,
            ``ada_rt``, ``lecam`` when enabled.
        """
        x, y = batch["x"], batch["y"]
        if y.shape[1] != len(self.classes):
            raise ValueError(f"batch y has {y.shape[1]} columns, UCGAN has {len(self.classes)} classes")
        b = x.shape[0]
        fake = self.G(randn((b, self.z_dim), generator=generator, device=x.device))
        out: dict[str, float] = {}

        update_d, update_g = schedule_updates(self.schedule, step, self.schedule_steps)
        reg = self.reg

        # D: lam * L_D on real vs generated.
        real_logits = discriminate(self.D, x, reg=reg, generator=generator)
        fake_logits = discriminate(self.D, fake.detach(), reg=reg, generator=generator)
        if update_d:
            loss_d = self.lam * d_loss("bce", real_logits, fake_logits, reg=reg)
            opts["d"].zero_grad(set_to_none=True)
            loss_d.backward()
            opts["d"].step()
            out["loss_d"] = loss_d.item()

        # C: tau * (CE on real + xi * CE on confidently pseudo-labelled generated images).
        logits_real = self._logits(x)
        logits_gen = self._logits(fake.detach())
        loss_c = classifier_loss(logits_real, y)
        loss_c_fake = pseudo_label_loss(logits_gen, self.threshold)
        opts["c"].zero_grad(set_to_none=True)
        (self.tau * (loss_c + self.xi * loss_c_fake)).backward()
        opts["c"].step()

        # G: adversarial + regularisers + the generated half of tau * L_C, all through `fake`.
        # C in eval mode: the probabilities G optimises are the ones pseudo-labelling uses, and G's
        # batches leave C's batch-norm statistics alone.
        if update_g:
            with frozen(self.D, self.C), eval_mode(self.C):
                loss_adv = g_loss("bce", discriminate(self.D, fake, reg=reg, generator=generator))
                terms = self.score_terms(x, fake)
            loss_g = self.delta * loss_adv + self.tau * self.xi * terms["pseudo"]
            if "is" in terms:
                loss_g = loss_g + self.alpha * terms["is"]
            if "mmd" in terms:
                loss_g = loss_g + self.beta * terms["mmd"]
            if "style" in terms:
                loss_g = loss_g + (self.gamma + self.eta) * terms["style"]
            opts["g"].zero_grad(set_to_none=True)
            loss_g.backward()
            opts["g"].step()
            out.update(loss_g_adv=loss_adv.item(), loss_pseudo=terms["pseudo"].item(), loss_g=loss_g.item())
            for name in ("is", "mmd", "style"):
                if name in terms:
                    out[f"loss_{name}"] = terms[name].item()

        with torch.no_grad():
            labelled = y.sum(dim=1) > 0
            top = logits_real.argmax(dim=1)
            hit = y.gather(1, top[:, None]).squeeze(1) > 0
            out["c_acc_real"] = (hit & labelled).sum().item() / max(int(labelled.sum().item()), 1)
            out["acceptance"] = pseudo_label_mask(logits_gen, self.threshold).float().mean().item()
        out.update(
            d_real=real_logits.float().mean().item(),
            d_fake=fake_logits.float().mean().item(),
            loss_c=loss_c.item(),
            loss_c_fake=loss_c_fake.item(),
            update_d=float(update_d),
            update_g=float(update_g),
        )
        if reg is not None:
            out.update(reg.logs())
        return out
