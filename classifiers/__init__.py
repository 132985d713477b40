"""Chest X-ray classifiers: a timm model builder, a training loop and multi-label evaluation.

A library: it depends on torch, timm, numpy, scikit-learn and the ground floor :mod:`cxrbase`
(collate, uint8 <-> [-1, 1], labels, balanced weights, device, progress bar, versions) and
never imports ``augment``, hydra, omegaconf, ray or optuna.

Conventions: ``x`` float in [-1, 1], B x 1 x H x W; ``y`` multi-hot float B x C with NaN for
"not labelled"; dataset items are dicts ``{"image": uint8 1 x H x W, "labels": float32 C,
"weight": optional float32 scalar}`` (see :mod:`cxrbase.items`).
"""

from classifiers.evaluate import Predictions, choose_thresholds, evaluate, predict
from classifiers.model import MODEL_ALIASES, create_classifier, load_classifier, load_pretrained, save_checkpoint
from classifiers.train import TrainResult, masked_bce_with_logits, train_classifier

__all__ = [
    "MODEL_ALIASES",
    "Predictions",
    "TrainResult",
    "choose_thresholds",
    "create_classifier",
    "evaluate",
    "load_classifier",
    "load_pretrained",
    "masked_bce_with_logits",
    "predict",
    "save_checkpoint",
    "train_classifier",
]
