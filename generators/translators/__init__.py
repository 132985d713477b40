"""Image-to-image translators that heal an image and expose where it changed.

Each family is a system (``GANSystem`` + ``Translator``): ``translate(x, target)`` returns a
``Translation(image, diff_map = x - image, mask=None)``; ``generators.masks`` turns difference maps
into masks.  ``x``: images in [-1, 1], B x 1 x H x W; targets: multi-hot B x C, all zeros = healthy.

- ``fixed_point.FixedPointGAN``: StarGAN-style G(x, c) with fixed-point (same-domain) learning.
- ``taggan.TagGAN``: disease map M(x, c), healthy y = x - M, backward generator and cycle loss.
- ``branched.BranchedGAN``: N summed generator branches, branch 1 carrying the class distinction.
"""

from generators.translators.branched import BranchedGAN
from generators.translators.fixed_point import FixedPointGAN
from generators.translators.taggan import TagGAN

__all__ = ["BranchedGAN", "FixedPointGAN", "TagGAN"]
