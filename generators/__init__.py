"""GAN families (samplers and translators) and the one training loop.

A library: torch, timm and numpy only; never imports ``augment``, hydra, omegaconf, ray or optuna.
Conventions: ``x`` images float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x C; masks in {0, 1}.
"""
