"""Conditional GAN sampler (XRAY-GAN Sec. 4.1, Eq. 6): noise + classes -> chest X-ray.

Conventions: ``x`` images float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x C over ``classes``
(NaN already replaced by 0 by the loop; all zeros allowed).  G sees ``[z, E_g y]``; D is conditioned by a
projection ``<E_d y, phi(x)>`` (default) or by ``y`` concatenated as constant input maps.

Adversarial losses (``generators.adversarial``): non-saturating BCE (the paper's), hinge, least squares,
or WGAN-GP (``"wgan-gp"``, also spelt ``"wgan"``: the Wasserstein critic with its gradient penalty).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from generators.adversarial import check_kind, d_loss, discriminate, frozen, g_loss, gradient_penalty, randn
from generators.nets import DCGANDiscriminator, DCGANGenerator


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
        d_conditioning: ``"projection"`` or ``"concat"``.
        max_mult: cap on the width multipliers of G and D.

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
    ) -> None:
        super().__init__()
        adv = check_kind(loss)
        if not classes:
            raise ValueError("CGAN needs at least one class")
        if n_critic < 1:
            raise ValueError(f"n_critic must be >= 1, got {n_critic}")
        self.classes = list(classes)
        self.image_size = image_size
        self.z_dim = z_dim
        self.loss = loss  # the config's spelling
        self.adv = adv  # the canonical kind (``"wgan-gp"`` -> ``"wgan"``)
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, tuple(betas)
        self.gp_weight = gp_weight
        self.n_critic = n_critic
        k = len(self.classes)
        self.G = DCGANGenerator(
            image_size=image_size, z_dim=z_dim, channels=g_channels, max_mult=max_mult, num_classes=k
        )
        # Batch norm mixes samples, which breaks WGAN-GP's per-sample penalty and fights spectral norm.
        norm = "none" if (adv == "wgan" or spectral_norm) else "batch"
        self.D = DCGANDiscriminator(
            image_size=image_size,
            channels=d_channels,
            max_mult=max_mult,
            num_classes=k,
            conditioning=d_conditioning,
            norm=norm,
            spectral_norm=spectral_norm,
        )

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
        """``n_critic`` D updates then one G update, all conditioned on the real batch's ``y``.

        G is conditioned on the batch's own label vectors, so generated class combinations follow the
        (possibly class-balanced) data sampler.

        Args:
            batch: ``{"x": B x 1 x H x W in [-1, 1], "y": B x C}``.
            opts: ``{"g": ..., "d": ...}`` from ``configure_optimizers``.
            step: global step (unused: the schedule is constant).
            generator: source of all randomness in this step.

        Returns:
            ``loss_d``, ``loss_g``, ``d_real`` / ``d_fake`` (mean logits) and, for WGAN-GP, ``gp``.
        """
        x, y = batch["x"], batch["y"].to(batch["x"].dtype)
        b = x.shape[0]
        out: dict[str, float] = {}
        for _ in range(self.n_critic):
            z = randn((b, self.z_dim), generator=generator, device=x.device)
            with torch.no_grad():
                fake = self.G(z, y)
            real_logits, fake_logits = discriminate(self.D, x, y), discriminate(self.D, fake, y)
            loss_d = d_loss(self.adv, real_logits, fake_logits)
            if self.adv == "wgan":
                gp = gradient_penalty(lambda v: discriminate(self.D, v, y), x, fake, generator=generator)
                loss_d = loss_d + self.gp_weight * gp
                out["gp"] = gp.item()
            opts["d"].zero_grad(set_to_none=True)
            loss_d.backward()
            opts["d"].step()
        out["loss_d"] = loss_d.item()
        out["d_real"] = real_logits.float().mean().item()
        out["d_fake"] = fake_logits.float().mean().item()

        z = randn((b, self.z_dim), generator=generator, device=x.device)
        fake = self.G(z, y)
        with frozen(self.D):  # D's weight gradients are not needed for G's update
            loss_g = g_loss(self.adv, discriminate(self.D, fake, y))
        opts["g"].zero_grad(set_to_none=True)
        loss_g.backward()
        opts["g"].step()
        out["loss_g"] = loss_g.item()
        return out
