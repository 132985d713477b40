"""The classifier training loop: masked multi-label BCE, AdamW, warm-up + cosine, early stopping.

Conventions: ``x`` float in [-1, 1], B x 1 x H x W, made on the device from uint8 items
(``x = image / 127.5 - 1``, see :mod:`cxrbase.items`); ``y`` multi-hot float B x C with NaN for
"not labelled", which contributes neither loss nor gradient; an optional per-sample ``weight``
(XRAY-GAN's xi for synthetic images) scales each sample's loss.

The loop owns device placement, AMP (bf16 autocast, CUDA only), channels_last (CUDA only),
seeding (``torch.Generator`` objects; dropout draws inside ``torch.random.fork_rng`` so the
caller's global RNG state is untouched), checkpoints, the progress bar and the callback.
Epochs are numbered from 1.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from classifiers.evaluate import evaluate, masked_bce_from_probs, predict
from classifiers.model import save_checkpoint
from cxrbase import balanced_weights, collate, dataset_labels, resolve_device, to_x
from cxrbase import progress as progress_bar

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train_classifier` returns.

    Attributes:
        best_epoch: epoch (from 1) whose weights the model holds at the end.
        best_val_auc: validation mean AUC at that epoch (None without a defined AUC).
        history: one dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_mean_auc``,
            ``val_auc`` (per class), ``lr``, ``seconds``, ``images_per_second``.
        train_seconds: wall time of the whole call.
        images_per_second: training images per second of training steps (validation excluded).
        steps: optimizer steps taken.
    """

    best_epoch: int
    best_val_auc: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    steps: int = 0


def masked_bce_with_logits(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy over labelled entries, a weighted mean.

    ``loss = sum(w_i * m_ic * bce_ic) / sum(w_i * m_ic)`` where ``m_ic`` is 0 for a NaN label.
    NaN labels therefore give no loss and no gradient, and a sample with weight 0 changes
    nothing at all (neither numerator nor denominator). When nothing is labelled (or every
    weight is 0) the loss is 0 with zero gradient.

    Args:
        logits: B x C.
        targets: B x C, 1 / 0 / NaN.
        weight: B per-sample weights (>= 0), or None for 1.
    """
    mask = ~torch.isnan(targets)
    safe = torch.where(mask, targets, torch.zeros_like(targets)).to(torch.float32)
    per = F.binary_cross_entropy_with_logits(logits.float(), safe, reduction="none")
    m = mask.to(torch.float32)
    if weight is not None:
        m = m * weight.to(torch.float32).reshape(-1, 1)
    # where() rather than multiply, so a NaN/inf logit under a masked label cannot leak NaN.
    total = torch.where(m > 0, per * m, torch.zeros_like(per)).sum()
    return total / m.sum().clamp_min(1e-12)


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and norm scales (1-d tensors): decaying them only hurts.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _image_size(dataset: Dataset) -> int:
    image = torch.as_tensor(dataset[0]["image"])
    return int(image.shape[-1])


def train_classifier(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_frac: float = 0.05,
    device: str | torch.device = "cpu",
    seed: int = 0,
    balanced: bool = False,
    patience: int | None = None,
    ckpt_path: str | os.PathLike | None = None,
    ckpt_meta: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    amp: bool = True,
    sampler: Sampler[list[int]] | Iterable[list[int]] | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> TrainResult:
    """Train a multi-label classifier and leave it holding its best validation weights.

    Args:
        model: maps ``x`` to logits B x C (e.g. from :func:`classifiers.model.create_classifier`).
        train_ds: training items (:mod:`cxrbase.items` contract).
        val_ds: validation items; None trains without validation (the last epoch counts as best).
        epochs: maximum number of epochs.
        batch_size: images per step (ignored when ``sampler`` is given).
        lr: peak AdamW learning rate.
        weight_decay: AdamW decay on weight matrices (not on biases or norms).
        warmup_frac: share of all steps spent in linear warm-up before the cosine decay.
        device: training device; AMP, channels_last and pinned memory are used only on CUDA.
        seed: seeds shuffling / sampling generators and the in-training randomness (dropout).
        balanced: class-balanced sampling with replacement (rare findings drawn more often).
        patience: stop after this many epochs without a better validation mean AUC.
        ckpt_path: where to save the best epoch's checkpoint (atomically, on every improvement).
        ckpt_meta: for the checkpoint: ``model_cfg`` (required with ``ckpt_path``), ``classes``
            (default: ``train_ds.classes``), ``image_size`` (default: from the first item),
            ``extra``.
        num_workers: DataLoader workers.
        amp: bf16 autocast on CUDA.
        sampler: a batch sampler (yields lists of indices into ``train_ds``), e.g.
            ``augment.data.mixing.MixedBatchSampler``; replaces shuffling and ``balanced``.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each validation (with the epoch's
            history entry); whatever it raises (e.g. a pruning signal) propagates, after the
            model has been given its best weights so far.
        progress: show a progress bar (only when stderr is a terminal).
        max_steps: a step budget: stop after this many optimizer steps (the learning-rate schedule
            spans them); the last, partial epoch is validated too. None: ``epochs`` full epochs.
        augment: called as ``augment(images, generator)`` on every uint8 training batch (already
            on ``device``), e.g. :class:`classifiers.classic.ClassicAugment`; ``generator`` is a
            CPU generator seeded from ``seed``.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: inconsistent arguments (``balanced`` with ``sampler``, a checkpoint path
            without ``model_cfg``, non-positive epochs or batch size).
        FloatingPointError: the training loss became NaN or infinite.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if balanced and sampler is not None:
        raise ValueError("balanced=True and an explicit sampler exclude each other")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    meta: dict[str, Any] = {}
    if ckpt_path is not None:
        meta = dict(ckpt_meta or {})
        if "model_cfg" not in meta:
            raise ValueError("ckpt_path needs ckpt_meta['model_cfg'] (create_classifier kwargs) to rebuild the model")
        if meta.get("classes") is None:
            classes = getattr(train_ds, "classes", None)
            if classes is None:
                raise ValueError("ckpt_meta['classes'] is required: train_ds has no classes attribute")
            meta["classes"] = list(classes)
        if meta.get("image_size") is None:
            meta["image_size"] = _image_size(train_ds)

    device = resolve_device(device)
    cuda = device.type == "cuda"
    model.to(device)
    if cuda:
        model.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(seed)
    loader_kw: dict[str, Any] = {
        "num_workers": num_workers,
        "collate_fn": collate,
        "pin_memory": cuda,
        "persistent_workers": num_workers > 0,
        "generator": gen,
    }
    if sampler is not None:
        loader = DataLoader(train_ds, batch_sampler=sampler, **loader_kw)
    else:
        n = len(train_ds)
        drop_last = n > batch_size  # never a 1-image remainder batch (BatchNorm cannot train on it)
        if balanced:
            weights = balanced_weights(dataset_labels(train_ds))
            wsampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), num_samples=n,
                                             replacement=True, generator=gen)
            loader = DataLoader(train_ds, batch_size=batch_size, sampler=wsampler, drop_last=drop_last, **loader_kw)
        else:
            loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=drop_last, **loader_kw)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("the training set gives no batches (is it empty?)")
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        epochs = math.ceil(max_steps / steps_per_epoch)
        total_steps = int(max_steps)
    aug_gen = torch.Generator().manual_seed(seed + 0x5EED) if augment is not None else None
    warmup_steps = int(round(warmup_frac * total_steps)) if warmup_frac > 0 else 0
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_steps))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else nullcontext()
    classes = list(meta.get("classes") or getattr(val_ds, "classes", None) or getattr(train_ds, "classes", None) or [])

    history: list[dict[str, Any]] = []
    best_epoch, best_auc, best_state = 0, None, None
    best_score = -math.inf
    stale = 0
    step_seconds, images_seen = 0.0, 0
    steps_done = 0
    start = time.perf_counter()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []

    def restore_best() -> None:
        if best_state is not None:
            model.load_state_dict(best_state)

    try:
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed)  # dropout / drop-path draws, inside the fork only
            for epoch in range(1, epochs + 1):
                model.train()
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=device)
                n_images = 0
                # One iterator made and dropped per epoch, as the loop always did (it wrapped the loader in
                # tqdm.auto, whose constructor calls iter(loader)): it draws a base seed from ``gen`` (and,
                # with workers, prefetches sampler indices), so keeping it keeps every batch bit-identical.
                _dropped = iter(loader)
                bar = progress_bar(loader, total=steps_per_epoch, desc=f"classifier epoch {epoch}/{epochs}",
                                   enabled=progress)
                for i, batch in enumerate(bar):
                    if steps_done >= total_steps:
                        break
                    images = batch["image"]
                    if augment is not None:  # on the uint8 batch, on the training device
                        images = augment(images.to(device, non_blocking=True), aug_gen)
                    x = to_x(images, device, channels_last=cuda)
                    y = batch["labels"].to(device, non_blocking=True)
                    w = batch["weight"].to(device, non_blocking=True)
                    with autocast:
                        logits = model(x)
                    loss = masked_bce_with_logits(logits, y, w)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    steps_done += 1
                    loss_sum += loss.detach()
                    n_images += len(x)
                    if i % 20 == 0 and not getattr(bar, "disable", True):
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                if cuda:
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                step_seconds += seconds
                images_seen += n_images
                train_loss = float(loss_sum.item()) / max(1, steps_done - (epoch - 1) * steps_per_epoch)
                if not math.isfinite(train_loss):
                    raise FloatingPointError(
                        f"training loss became {train_loss} in epoch {epoch}; lower lr (now {lr}) or check the labels"
                    )
                record: dict[str, Any] = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "lr": float(optimizer.param_groups[0]["lr"]),
                    "seconds": seconds,
                    "images_per_second": n_images / seconds if seconds > 0 else 0.0,
                    "val_loss": None,
                    "val_mean_auc": None,
                    "val_auc": {},
                }
                if val_ds is not None and len(val_ds) > 0:
                    pred = predict(model, val_ds, batch_size=max(batch_size, 64), device=device,
                                   num_workers=num_workers, return_features=False, amp=amp)
                    names = classes or [f"class_{c}" for c in range(pred.probs.shape[1])]
                    metrics = evaluate(pred.probs, pred.labels, names)
                    record.update(val_loss=masked_bce_from_probs(pred.probs, pred.labels),
                                  val_mean_auc=metrics["mean_auc"], val_auc=metrics["auc"])
                history.append(record)
                score = record["val_mean_auc"]
                improved = (score is not None and score > best_score) or (val_ds is None or len(val_ds) == 0)
                if improved:
                    best_epoch, best_auc, stale = epoch, score, 0
                    best_score = score if score is not None else best_score
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                    if ckpt_path is not None:
                        save_checkpoint(ckpt_path, model, model_cfg=meta["model_cfg"], classes=meta["classes"],
                                        image_size=meta["image_size"], metrics=record, extra=meta.get("extra"))
                else:
                    stale += 1
                log.info("epoch %d/%d: train loss %.4f, val mean AUC %s%s", epoch, epochs, train_loss,
                         "n/a" if score is None else f"{score:.4f}", " (best)" if improved else "")
                if on_epoch is not None:
                    on_epoch(epoch, copy.deepcopy(record))
                if patience is not None and stale >= patience:
                    log.info("early stop after epoch %d: no better val AUC for %d epochs", epoch, patience)
                    break
                if steps_done >= total_steps:
                    break
    finally:
        restore_best()

    if best_state is None:
        # No epoch had a defined validation AUC: keep the final weights and say so.
        log.warning("no epoch had a defined validation AUC; keeping the last epoch's weights")
        best_epoch = history[-1]["epoch"]
        if ckpt_path is not None:
            save_checkpoint(ckpt_path, model, model_cfg=meta["model_cfg"], classes=meta["classes"],
                            image_size=meta["image_size"], metrics=history[-1], extra=meta.get("extra"))
    total = time.perf_counter() - start
    return TrainResult(
        best_epoch=best_epoch,
        best_val_auc=best_auc,
        history=history,
        train_seconds=total,
        images_per_second=images_seen / step_seconds if step_seconds > 0 else 0.0,
        steps=steps_done,
    )


__all__ = ["TrainResult", "cosine_with_warmup", "masked_bce_with_logits", "train_classifier"]
