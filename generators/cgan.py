"""Conditional GAN sampler (XRAY-GAN Sec. 4.1, Eq. 6): noise + classes -> chest X-ray.

Conventions: ``x`` images float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x C over ``classes``
(NaN already replaced by 0 by the loop; all zeros allowed).  G sees ``[z, E_g y]``; D is conditioned by a
projection ``<E_d y, phi(x)>`` (default) or by ``y`` concatenated as constant input maps.

Adversarial losses (``generators.adversarial``): non-saturating BCE (the paper's), hinge, least squares,
or WGAN-GP (``"wgan-gp"``, also spelt ``"wgan"``: the Wasserstein critic with its gradient penalty).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from generators.adversarial import (
    check_kind,
    d_loss,
    discriminate,
    frozen,
    g_loss,
    gradient_penalty,
    make_regulariser,
    rand,
    randn,
)
from generators.fastgan import FastGANDiscriminator, FastGANGenerator
from generators.nets import DCGANDiscriminator, DCGANGenerator

ARCHS = ("dcgan", "fastgan")


class CGAN(nn.Module):
    """Conditional DCGAN with class embeddings in G and D.

    Args:
        classes: class names, the order of ``y``'s columns.
        image_size: output side, power of two in [32, 256].
        z_dim: noise dimension.
        g_channels: generator width multiplier.
        d_channels: discriminator width multiplier.
        loss: ``"bce"`` (non-saturating, the paper's), ``"hinge"``, ``"lsgan"`` or ``"wgan-gp"``
            (= ``"wgan"``: Wasserstein critic plus gradient penalty, and a D without batch norm).
        spectral_norm: spectral norm on every D layer.
        lr_g: generator Adam learning rate.
        lr_d: discriminator Adam learning rate.
        betas: Adam betas for both (the paper: first moment 0.5).
        gp_weight: weight of the WGAN-GP gradient penalty (used only with the Wasserstein loss).
        n_critic: discriminator updates per generator update (5 is usual for WGAN-GP).
        d_conditioning: ``"projection"`` or ``"concat"`` (DCGAN only; FastGAN's D projects).
        max_mult: cap on the width multipliers of G and D.
        arch: ``"dcgan"`` (XRAY-GAN's) or ``"fastgan"`` (:mod:`generators.fastgan`: skip-layer
            excitation in G, a D with self-supervised decoders trained on real images with L1).
        recon_weight: weight of the FastGAN D's reconstruction loss (used only with ``"fastgan"``).
        fewshot: keyword arguments of :func:`generators.adversarial.make_regulariser` (``diffaug``,
            ``diffaug_p``, ``diffaug_adaptive``, ``ada_target``, ``ada_images``, ``lecam_weight``,
            ``lecam_decay``; the family YAML's ``fewshot:`` mapping); None or {} = off:
            differentiable augmentation of every D input and LeCam regularisation
            (:func:`generators.adversarial.make_regulariser`); all off by default.

    With ``n_critic > 1`` each critic update sees its own real images: the system asks the loop for
    ``real_batches_per_step = n_critic`` batches per step (``fit`` then delivers ``n_critic * B``
    images, split here into ``n_critic`` chunks), rather than showing D the same batch repeatedly.

    Raises:
        ValueError: for an unknown ``loss`` (the message lists the choices) or a bad ``image_size``.
    """

    kind = "sampler"
    conditional = True  # sample(n, y) draws images of the classes y
    adds_no_finding = False

    def __init__(
        self,
        *,
        classes: list[str],
        image_size: int = 64,
        z_dim: int = 128,
        g_channels: int = 64,
        d_channels: int = 64,
        loss: str = "bce",
        spectral_norm: bool = False,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        gp_weight: float = 10.0,
        n_critic: int = 1,
        d_conditioning: str = "projection",
        max_mult: int = 8,
        arch: str = "dcgan",
        recon_weight: float = 1.0,
        fewshot: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        adv = check_kind(loss)
        if not classes:
            raise ValueError("CGAN needs at least one class")
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        if arch not in ARCHS:
            raise ValueError(f"unknown CGAN arch {arch!r}; choose one of {', '.join(ARCHS)}")
        self.classes = list(classes)
        self.image_size = image_size
        self.z_dim = z_dim
        self.loss = loss  # the config's spelling
        self.adv = adv  # the canonical kind (``"wgan-gp"`` -> ``"wgan"``)
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, tuple(betas)
        self.gp_weight = gp_weight
        self.n_critic = n_critic
        self.arch = arch
        self.recon_weight = recon_weight
        k = len(self.classes)
        # Batch norm mixes samples, which breaks WGAN-GP's per-sample penalty and fights spectral norm.
        norm = "none" if (adv == "wgan" or spectral_norm) else "batch"
        if arch == "fastgan":
            self.G = FastGANGenerator(
                image_size=image_size, z_dim=z_dim, channels=g_channels, max_mult=max_mult, num_classes=k
            )
            self.D = FastGANDiscriminator(
                image_size=image_size,
                channels=d_channels,
                max_mult=max_mult,
                num_classes=k,
                norm="none" if adv == "wgan" else "batch",
                spectral_norm=spectral_norm,
            )
        else:
            self.G = DCGANGenerator(
                image_size=image_size, z_dim=z_dim, channels=g_channels, max_mult=max_mult, num_classes=k
            )
            self.D = DCGANDiscriminator(
                image_size=image_size,
                channels=d_channels,
                max_mult=max_mult,
                num_classes=k,
                conditioning=d_conditioning,
                norm=norm,
                spectral_norm=spectral_norm,
            )
        self.reg = make_regulariser(**dict(fewshot or {}))

    @property
    def real_batches_per_step(self) -> int:
        """Real batches ``fit`` delivers per step (one per critic update)."""
        return self.n_critic

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        """``G(z | y)``: images B x 1 x H x W in [-1, 1]."""
        return self.G(z, y)

    def sample(self, n: int, y: Tensor | None = None, *, generator: torch.Generator) -> Tensor:
        """Draw ``n`` images.

        Args:
            n: number of images.
            y: n x C multi-hot classes; None draws one class per image uniformly (one-hot).
            generator: source of the noise (and of the classes when ``y`` is None).

        Returns:
            Images n x 1 x H x W in [-1, 1].
        """
        device = next(self.G.parameters()).device
        if y is None:
            idx = torch.randint(len(self.classes), (n,), generator=generator, device=generator.device)
            y = nn.functional.one_hot(idx, len(self.classes)).float()
        if y.shape != (n, len(self.classes)):
            raise ValueError(f"y must be {n} x {len(self.classes)}, got {tuple(y.shape)}")
        z = randn((n, self.z_dim), generator=generator, device=device)
        return self.G(z, y.to(device=device, dtype=z.dtype))

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Adam for G (``"g"``) and D (``"d"``)."""
        return {
            "g": torch.optim.Adam(self.G.parameters(), lr=self.lr_g, betas=self.betas),
            "d": torch.optim.Adam(self.D.parameters(), lr=self.lr_d, betas=self.betas),
        }

    def training_step(
        self,
        batch: dict[str, Tensor],
        opts: dict[str, torch.optim.Optimizer],
        *,
        step: int,
        generator: torch.Generator,
    ) -> dict[str, float]:
        """``n_critic`` D updates, each on its own chunk of the batch, then one G update.

        G is conditioned on the batch's own label vectors, so generated class combinations follow the
        (possibly class-balanced) data sampler.

        Args:
            batch: ``{"x": (n_critic B) x 1 x H x W in [-1, 1], "y": (n_critic B) x C}``: ``n_critic``
                real batches, one per critic update (``fit`` delivers them; see ``real_batches_per_step``).
            opts: ``{"g": ..., "d": ...}`` from ``configure_optimizers``.
            step: global step (unused: the schedule is constant).
            generator: source of all randomness in this step.

        Returns:
            ``loss_d``, ``loss_g``, ``d_real`` / ``d_fake`` (mean logits) and, for WGAN-GP, ``gp``.
        """
        xs, ys = batch["x"], batch["y"].to(batch["x"].dtype)
        if xs.shape[0] < self.n_critic:
            raise ValueError(f"a batch of {xs.shape[0]} images cannot feed n_critic={self.n_critic} critic updates")
        # fit delivers n_critic * B rows, so the chunks are equal; a hand-made batch may split unevenly.
        chunks = list(zip(xs.tensor_split(self.n_critic), ys.tensor_split(self.n_critic)))
        out: dict[str, float] = {}
        reg = self.reg
        for x, y in chunks:  # a fresh real batch per critic update
            b = x.shape[0]
            z = randn((b, self.z_dim), generator=generator, device=x.device)
            with torch.no_grad():
                fake = self.G(z, y)
            if self.arch == "fastgan":
                q = int(rand((1,), generator=generator, device=x.device).item() * 4) % 4
                real_logits, rec = discriminate(
                    lambda v, c: self.D(v, c, quadrant=q), x, y, reg=reg, generator=generator
                )
            else:
                real_logits = discriminate(self.D, x, y, reg=reg, generator=generator)
            fake_logits = discriminate(self.D, fake, y, reg=reg, generator=generator)
            loss_d = d_loss(self.adv, real_logits, fake_logits, reg=reg)
            if self.arch == "fastgan":
                loss_d = loss_d + self.recon_weight * rec
                out["recon"] = rec.item()
            if self.adv == "wgan":
                gp = gradient_penalty(
                    lambda v: discriminate(self.D, v, y, reg=reg, generator=generator), x, fake, generator=generator
                )
                loss_d = loss_d + self.gp_weight * gp
                out["gp"] = gp.item()
            opts["d"].zero_grad(set_to_none=True)
            loss_d.backward()
            opts["d"].step()
        out["loss_d"] = loss_d.item()
        out["d_real"] = real_logits.float().mean().item()
        out["d_fake"] = fake_logits.float().mean().item()

        # G is conditioned on the first critic batch's labels (the class mix of the data sampler).
        y = chunks[0][1]
        z = randn((y.shape[0], self.z_dim), generator=generator, device=xs.device)
        fake = self.G(z, y)
        with frozen(self.D):  # D's weight gradients are not needed for G's update
            loss_g = g_loss(self.adv, discriminate(self.D, fake, y, reg=reg, generator=generator))
        opts["g"].zero_grad(set_to_none=True)
        loss_g.backward()
        opts["g"].step()
        out["loss_g"] = loss_g.item()
        if reg is not None:
            out.update(reg.logs())
        return out
