"""GAN families (samplers and translators), their adversarial toolkit and the one training loop.

A library: torch, timm and numpy only, standing on the ground floor ``cxrbase`` (item contract,
uint8 <-> [-1, 1], devices, progress, versions, PNG); never imports ``augment``, hydra, omegaconf, ray
or optuna.  Conventions: ``x`` images float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x C;
masks in {0, 1}.

- ``base``: the ``GANSystem`` / ``Sampler`` / ``Translator`` protocols and the capability attributes
  (``kind``, ``conditional``, ``adds_no_finding``) every family declares.
- ``adversarial``: losses (bce, hinge, lsgan, wgan), gradient penalty, R1, ``frozen``, noise draws and
  ``discriminate``, the one seam where every family's discriminator sees images; there the few-shot
  tools act for every family: differentiable augmentation (fixed or ADA probability) and LeCam
  (``DiscriminatorRegulariser``, built from each family's ``diffaug*`` / ``ada_*`` / ``lecam_*`` keys).
- ``cgan``, ``ucgan`` (samplers, on the DCGAN blocks of ``nets``; CGAN also on the FastGAN-style
  blocks of ``fastgan``, ``arch="fastgan"``); ``translators/`` ``fixed_point``,
  ``taggan``, ``branched``.
- ``train``: ``fit`` and its hooks; ``checkpoint``: checkpoint files; ``masks``: difference maps -> masks.
"""
