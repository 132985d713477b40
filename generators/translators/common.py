"""Helpers shared by the translator systems: label cleaning, target sampling, grids, optimiser steps.

``x``: images in [-1, 1], B x 1 x H x W; ``y``: multi-hot float B x C (NaN = not labelled).
Random draws use the ``torch.Generator`` handed in by the training loop, never the global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from generators.adversarial import rand, randperm


def clean_labels(y: Tensor) -> Tensor:
    """Float copy of ``y`` with NaN (not labelled) read as 0 (absent)."""
    y = y.float()
    return torch.nan_to_num(y, nan=0.0)


def sample_targets(y: Tensor, *, generator: torch.Generator, p_healthy: float) -> Tensor:
    """Target domains for a batch: another image's labels (a batch permutation, as StarGAN samples
    multi-attribute targets), replaced by all zeros (``No Finding``) with probability ``p_healthy`` so the
    translation that inference uses, to healthy, is always trained."""
    perm = randperm(y.shape[0], generator=generator, device=y.device)
    target = y[perm].clone()
    healthy = rand((y.shape[0], 1), generator=generator, device=y.device, dtype=y.dtype) < p_healthy
    return torch.where(healthy, torch.zeros_like(target), target)


def complementary_targets(y: Tensor, *, generator: torch.Generator) -> Tensor:
    """The other class of a healthy/abnormal pair, generalised to multi-hot labels.

    An abnormal image's target is healthy (all zeros).  A healthy image's target is the labels of a
    random abnormal image of the batch, or one random finding when the batch has none.
    """
    b, n_cls = y.shape
    abnormal = y.sum(1) > 0
    target = torch.zeros_like(y)
    healthy_idx = (~abnormal).nonzero().flatten()
    if healthy_idx.numel() == 0:
        return target
    ab_idx = abnormal.nonzero().flatten()
    u = rand((healthy_idx.numel(),), generator=generator, device=y.device, dtype=y.dtype)
    if ab_idx.numel() > 0:
        pick = (u * ab_idx.numel()).long().clamp_max(ab_idx.numel() - 1)
        target[healthy_idx] = y[ab_idx[pick]]
    else:
        cls = (u * n_cls).long().clamp_max(n_cls - 1)
        target[healthy_idx, cls] = 1.0
    return target


def translation_grid(x: Tensor, image: Tensor, ncol: int = 8) -> Tensor:
    """Rows input / translated / difference as one (3 * ncol) x 1 x H x W batch in [-1, 1].

    Rows are ``ncol`` wide (the training loop's ``image_grid`` lays out 8 per row): the first ``ncol``
    images are shown, and a smaller batch is padded with black tiles so the rows stay aligned.  The
    difference ``x - image`` is divided by its largest magnitude, so 0 is mid-grey, removed opacity is
    bright and added opacity is dark.
    """
    x, image = x[:ncol].detach(), image[:ncol].detach()
    diff = x - image
    diff = diff / diff.abs().max().clamp_min(1e-8)
    pad = ncol - x.shape[0]
    rows = []
    for r in (x, image, diff):
        if pad > 0:
            r = torch.cat([r, r.new_full((pad, *r.shape[1:]), -1.0)])
        rows.append(r)
    return torch.cat(rows, dim=0)


def step_optimizer(opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """zero_grad, backward, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
