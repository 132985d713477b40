"""Prediction and multi-label evaluation: per-class ROC AUC, thresholds, ROC curves.

Conventions: ``x`` float in [-1, 1], B x 1 x H x W (see :mod:`cxrbase.items` for the item
contract); ``probs`` and ``labels`` are N x C arrays in class order; labels are 1 / 0 / NaN and
NaN entries are skipped by every metric. A class whose labelled samples lack positives or
negatives has no AUC: it is reported as ``None`` with the reason, never an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cxrbase import collate, resolve_device, to_x

log = logging.getLogger(__name__)

MAX_ROC_POINTS = 200


@dataclass
class Predictions:
    """Model outputs over a dataset, in dataset order.

    Attributes:
        probs: N x C float32 sigmoid probabilities.
        features: N x F float32 penultimate features (``forward_head(pre_logits=True)``);
            N x 0 when features were not requested.
        labels: N x C float32 labels (1 / 0 / NaN).
    """

    probs: np.ndarray
    features: np.ndarray
    labels: np.ndarray


def _features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        fmap = model.forward_features(x)
        # The head is cheap; calling it twice keeps logits exactly what forward() gives for any
        # timm head layout (norm / pre-logits / fc).
        return model.forward_head(fmap, pre_logits=True), model.forward_head(fmap)
    logits = model(x)
    return logits.new_zeros(len(x), 0), logits


@torch.inference_mode()
def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    return_features: bool = True,
    amp: bool = True,
) -> Predictions:
    """Run ``model`` over ``dataset`` in eval mode.

    Args:
        model: a timm classifier (or any module mapping ``x`` to logits; features then N x 0).
        dataset: items following :mod:`cxrbase.items`.
        batch_size: images per forward pass.
        device: where to run; the model is moved there.
        num_workers: DataLoader workers.
        return_features: also collect penultimate features.
        amp: bf16 autocast on CUDA (ignored on CPU).

    Returns:
        :class:`Predictions` in dataset order. The model's train/eval mode is restored.
    """
    device = resolve_device(device)
    cuda = device.type == "cuda"
    was_training = model.training
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate, pin_memory=cuda)
    probs, feats, labels = [], [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else nullcontext()
    try:
        for batch in loader:
            x = to_x(batch["image"], device, channels_last=cuda)
            with autocast:
                if return_features:
                    f, logits = _features_and_logits(model, x)
                    feats.append(f.float().flatten(1).cpu())
                else:
                    logits = model(x)
            probs.append(torch.sigmoid(logits.float()).cpu())
            labels.append(batch["labels"])
    finally:
        model.train(was_training)
    n = len(dataset)
    if not probs:
        c = getattr(model, "num_classes", 0)
        return Predictions(np.zeros((0, c), np.float32), np.zeros((0, 0), np.float32), np.zeros((0, c), np.float32))
    p = torch.cat(probs).numpy().astype(np.float32)
    f = torch.cat(feats).numpy().astype(np.float32) if feats else np.zeros((n, 0), np.float32)
    return Predictions(probs=p, features=f, labels=torch.cat(labels).numpy().astype(np.float32))


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.ndim == 1:
        probs, labels = probs[:, None], labels.reshape(-1, 1)
    if probs.shape != labels.shape or probs.ndim != 2:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} must both be N x C")
    return probs, labels


def _undefined_reason(n_pos: int, n_neg: int) -> str | None:
    if n_pos == 0 and n_neg == 0:
        return "no labelled samples"
    if n_pos == 0:
        return "no positives"
    if n_neg == 0:
        return "no negatives"
    return None


def decimate(fpr: np.ndarray, tpr: np.ndarray, max_points: int = MAX_ROC_POINTS) -> tuple[list[float], list[float]]:
    """Keep at most ``max_points`` ROC points, evenly spaced by index, first and last kept."""
    if len(fpr) > max_points:
        idx = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[idx], tpr[idx]
    return [float(v) for v in fpr], [float(v) for v in tpr]


def choose_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class decision threshold that maximises F1 on these (validation) predictions.

    A sample is predicted positive when ``prob >= threshold``. Classes without both positives
    and negatives get 0.5.

    Returns:
        float64 array of length C.
    """
    probs, labels = _check(probs, labels)
    out = np.full(probs.shape[1], 0.5)
    for c in range(probs.shape[1]):
        known = ~np.isnan(labels[:, c])
        y, p = labels[known, c], probs[known, c]
        if _undefined_reason(int((y == 1).sum()), int((y == 0).sum())) is not None:
            continue
        precision, recall, thresholds = precision_recall_curve(y, p)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        out[c] = float(thresholds[int(np.argmax(f1))])
    return out


def evaluate(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | float | None = None,
) -> dict[str, Any]:
    """Multi-label metrics that skip NaN labels.

    Args:
        probs: N x C probabilities.
        labels: N x C labels, 1 / 0 / NaN.
        classes: C class names.
        thresholds: per-class (or one shared) decision thresholds; 0.5 when None.

    Returns:
        ``{"mean_auc": float | None, "auc": {class: float | None}, "n": N, "macro_f1": float | None,
        "thresholds": [...], "per_class": {class: {"auc", "n_pos", "n_neg", "threshold",
        "precision", "recall", "f1", "accuracy", "roc": {"fpr": [...], "tpr": [...]},
        and "undefined": reason when auc is None}}}``. ``mean_auc`` averages the defined AUCs.
        precision / recall / F1 / accuracy are None only for a class with no labelled samples.
    """
    probs, labels = _check(probs, labels)
    classes = list(classes)
    if len(classes) != probs.shape[1]:
        raise ValueError(f"{len(classes)} class names for {probs.shape[1]} columns")
    if thresholds is None:
        thr = np.full(len(classes), 0.5)
    else:
        thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(classes),)).copy()
    per_class: dict[str, dict[str, Any]] = {}
    aucs: dict[str, float | None] = {}
    f1s: list[float] = []
    for c, name in enumerate(classes):
        known = ~np.isnan(labels[:, c])
        y, p = labels[known, c], probs[known, c]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        entry: dict[str, Any] = {"auc": None, "n_pos": n_pos, "n_neg": n_neg, "threshold": float(thr[c])}
        reason = _undefined_reason(n_pos, n_neg)
        if reason is None:
            entry["auc"] = float(roc_auc_score(y, p))
            fpr, tpr, _ = roc_curve(y, p)
            f, t = decimate(fpr, tpr)
            entry["roc"] = {"fpr": f, "tpr": t}
        else:
            entry["undefined"] = reason
            entry["roc"] = {"fpr": [], "tpr": []}
        if len(y):
            pred = p >= thr[c]
            tp = int((pred & (y == 1)).sum())
            fp = int((pred & (y == 0)).sum())
            fn = int((~pred & (y == 1)).sum())
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            entry.update(precision=precision, recall=recall, f1=f1,
                         accuracy=float((pred == (y == 1)).mean()))
            f1s.append(f1)
        else:
            entry.update(precision=None, recall=None, f1=None, accuracy=None)
        per_class[name] = entry
        aucs[name] = entry["auc"]
    defined = [a for a in aucs.values() if a is not None]
    return {
        "mean_auc": float(np.mean(defined)) if defined else None,
        "auc": aucs,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "n": int(probs.shape[0]),
        "thresholds": [float(t) for t in thr],
        "per_class": per_class,
    }


def masked_bce_from_probs(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float | None:
    """Mean binary cross-entropy over labelled entries (None when nothing is labelled)."""
    probs, labels = _check(probs, labels)
    known = ~np.isnan(labels)
    if not known.any():
        return None
    p = np.clip(probs[known], eps, 1 - eps)
    y = labels[known]
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


__all__ = ["MAX_ROC_POINTS", "Predictions", "choose_thresholds", "decimate", "evaluate",
           "masked_bce_from_probs", "predict"]
