"""Interfaces shared by every GAN family.

``x``: images, float in [-1, 1], B x 1 x H x W.  ``y``: multi-hot float, B x C over the family's
``classes`` (all zeros = healthy / ``No Finding``).  Masks are float or bool in {0, 1}.

A *system* is an ``nn.Module`` holding a family's networks.  It computes; the loop in
``generators.train.fit`` owns devices, AMP, seeds, EMA, checkpoints and logging.  Its adversarial
losses, penalties and discriminator calls come from ``generators.adversarial``.

Each family declares what it can do as class attributes (read by the model store, never inferred
from class names, the way timm models carry their ``default_cfg``):

- ``kind``: ``"sampler"`` (noise (+ class) -> image) or ``"translator"`` (image + target -> image).
- ``conditional``: a sampler's ``sample(n, y)`` uses ``y``; translators take a target, so True.
- ``adds_no_finding``: the family's ``classes`` end with ``"No Finding"``, which the caller appends
  to the findings (UCGAN's classifier has that output).

and as instance attributes ``classes`` (the columns of ``y``) and ``image_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass
class Translation:
    """Result of translating images to a target domain.

    Attributes:
        image: the translated image, B x 1 x H x W in [-1, 1].
        diff_map: signed difference ``x - image``, B x 1 x H x W. Positive where the translation
            removed brightness, i.e. where a finding added opacity (findings are bright on a radiograph).
        mask: binary mask B x 1 x H x W in {0, 1}, or ``None`` when no mask rule was applied.
    """

    image: Tensor
    diff_map: Tensor
    mask: Tensor | None = None


@runtime_checkable
class GANSystem(Protocol):
    """What ``fit`` needs from a family.

    ``training_step`` performs one full update (all of the family's D/G/C sub-steps) and returns
    floats for logging.  ``G`` is the module that EMA tracks and that sampling/translation uses.
    """

    G: nn.Module

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]: ...

    def training_step(
        self,
        batch: dict[str, Tensor],
        opts: dict[str, torch.optim.Optimizer],
        *,
        step: int,
        generator: torch.Generator,
    ) -> dict[str, float]: ...


@runtime_checkable
class Sampler(Protocol):
    """Noise (+ class) -> image."""

    kind: ClassVar[str]  # "sampler"
    conditional: ClassVar[bool]
    adds_no_finding: ClassVar[bool]
    classes: list[str]
    image_size: int

    def sample(self, n: int, y: Tensor | None = None, *, generator: torch.Generator) -> Tensor:
        """``n`` images B x 1 x H x W in [-1, 1]; ``y`` (n x C) conditions a conditional family."""
        ...


@runtime_checkable
class Translator(Protocol):
    """Image (+ target class) -> translated image and difference map."""

    kind: ClassVar[str]  # "translator"
    conditional: ClassVar[bool]
    adds_no_finding: ClassVar[bool]
    classes: list[str]
    image_size: int

    def translate(self, x: Tensor, target: Tensor) -> Translation:
        """Translate ``x`` to the domain ``target`` (B x C multi-hot; all zeros = ``No Finding``)."""
        ...
