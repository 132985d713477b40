"""The classifier work unit: one seed of a classifier on real (+ synthetic) data, a Ray work unit.

Used by ``augment classify`` (every seed), ``augment train`` (the CGAN's pseudo-labeller) and the
searches. Also the rules that pick the real training rows, shared by every model of a run:
``limit_positives`` (the low-data regime) and ``negatives`` (finding vs No Finding).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from augment.common import resolve_classes
from augment.config import build
from augment.data.labels import NO_FINDING
from augment.data.mixing import MixedBatchSampler, MixedDataset
from augment.data.sources import load_table
from augment.data.synthetic import SyntheticDataset
from augment.data.table import DataTable, XrayDataset
from augment.errors import UserError
from classifiers.evaluate import choose_thresholds, evaluate, predict
from classifiers.model import load_classifier, save_checkpoint
from classifiers.train import train_classifier
from cxrbase import balanced_weights, dataset_labels, resolve_device
from cxrbase.device import DeviceError

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """The training device (``auto`` = CUDA when available); a missing CUDA is the user's error."""
    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise UserError(f"classify.device: {exc}") from None


def limited_train_indices(table: DataTable, cfg: dict) -> np.ndarray:
    """Train rows, keeping at most ``classify.limit_positives[c]`` positives of each limited class.

    The subset is drawn once from ``classify.limit_seed`` (not the training seed), so every model of
    a run (generators, pseudo-labeller, baseline and augmented classifiers of every seed) sees the
    same real images: the synthetic data cannot smuggle in real positives a baseline never saw.
    """
    ccfg = cfg["classify"]
    idx = table.indices("train")
    limits = dict(ccfg["limit_positives"] or {})
    if not limits:
        return idx
    rng = np.random.default_rng([int(ccfg["limit_seed"]), 7])
    drop: set[int] = set()
    for name, cap in limits.items():
        col = table.column(resolve_classes([name])[0])[idx]
        pos = idx[col == 1]
        if len(pos) > int(cap):
            drop.update(rng.choice(pos, size=len(pos) - int(cap), replace=False).tolist())
    return np.asarray([i for i in idx if i not in drop], dtype=np.int64)


def selected_rows(table: DataTable, classes: list[str], negatives: str):
    """A filter of row indices: ``all`` keeps every image (a class's negatives are all the others);
    ``no_finding`` keeps images positive for a selected class or labelled No Finding, so the task is
    "finding vs No Finding" (images with only other findings are left out)."""
    if negatives == "all":
        return lambda idx: idx
    if negatives != "no_finding":
        raise UserError(f"classify.negatives={negatives}: choose all or no_finding")
    if NO_FINDING not in table.labelled_classes():
        raise UserError(f"classify.negatives=no_finding: data={table.source} has no {NO_FINDING} label; use all")
    ok = np.asarray(table.column(NO_FINDING) == 1)
    for c in classes:
        ok |= np.asarray(table.column(c) == 1)
    return lambda idx: np.asarray([i for i in idx if ok[i]], dtype=np.int64)


def open_synthetic(dirs: list[str], classes: list[str], threshold: float | None, image_size: int) -> Any:
    """Concatenated synthetic sets over ``classes``; one-line errors for bad folders."""
    sets = []
    for d in dirs:
        try:
            ds = SyntheticDataset(d, classes=classes, threshold=threshold, with_masks=False)
        except ValueError as exc:
            raise UserError(f"{exc}: pass a folder written by `augment generate` to --synthetic") from None
        card_classes = [c for c in (ds.card.get("classes") or []) if c != NO_FINDING]
        if card_classes and not set(card_classes) & set(classes):
            raise UserError(f"synthetic set {d} has classes {', '.join(card_classes)}, none of {', '.join(classes)}: "
                            "generate the classes you classify (--classes)")
        if len(ds) and int(ds[0]["image"].shape[-1]) != image_size:
            raise UserError(f"synthetic set {d} is {int(ds[0]['image'].shape[-1])} px but data.image_size={image_size}: "
                            "generate at the data's size or set data.image_size")
        sets.append(ds)
    return sets[0] if len(sets) == 1 else ConcatDataset(sets)


def train_seed(payload: dict, on_epoch: Any = None) -> dict:
    """One seed: train (or load) a classifier, evaluate on test. A Ray work unit (plain dict in/out).

    ``on_epoch(epoch, metrics)`` (in-process only, e.g. a search's pruning callback) is called after
    every validation with ``metrics["val_mean_auc"]``; an exception it raises stops training and
    propagates (after the best weights are restored)."""
    cfg, seed, out = payload["cfg"], int(payload["seed"]), Path(payload["out"])
    ccfg = cfg["classify"]
    classes = payload["classes"]
    table = load_table(cfg["data"], show_progress=False)
    device = pick_device(str(ccfg["device"]))
    keep = selected_rows(table, classes, str(ccfg["negatives"]))
    train_idx = keep(limited_train_indices(table, cfg))
    train_ds = XrayDataset(table, train_idx, classes)
    val_ds = XrayDataset(table, keep(table.indices("val")), classes)
    test_ds = XrayDataset(table, keep(table.indices("test")), classes)
    ckpt = out / f"seed{seed}" / "best.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info: dict[str, Any] = {"seed": seed, "n_train_real": len(train_ds)}
    if ccfg["checkpoint"]:
        try:
            model, meta = load_classifier(ccfg["checkpoint"])
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot load classify.checkpoint: {exc}") from None
        if list(meta.get("classes") or []) != classes:
            raise UserError(f"checkpoint classes {meta.get('classes')} differ from the data's {classes}: "
                            "pass --classes matching the checkpoint or train a new one")
        model.to(device)
    else:
        model_cfg = dict(cfg["classifier"])
        model = build({**model_cfg, "num_classes": len(classes), "init_seed": seed})
        sampler, ds = None, train_ds
        if payload.get("synthetic"):
            syn = open_synthetic(payload["synthetic"], classes, ccfg["threshold"], table.image_size)
            ds = MixedDataset(train_ds, syn, xi=float(ccfg["xi"]))
            weights = None
            if bool(ccfg["balanced"]):  # the real part stays class-balanced, as in the real-only baseline
                weights = balanced_weights(dataset_labels(train_ds))
            sampler = MixedBatchSampler(len(train_ds), len(syn), batch_size=int(ccfg["batch_size"]),
                                        ratio=float(ccfg["ratio"]), generator=torch.Generator().manual_seed(seed),
                                        real_weights=weights)
            info["n_train_synthetic"] = len(syn)
        result = train_classifier(
            model, ds, val_ds, epochs=int(ccfg["epochs"]), batch_size=int(ccfg["batch_size"]), lr=float(ccfg["lr"]),
            weight_decay=float(ccfg["weight_decay"]), warmup_frac=float(ccfg["warmup_frac"]), device=device, seed=seed,
            balanced=bool(ccfg["balanced"]) and sampler is None, patience=ccfg["patience"], ckpt_path=ckpt,
            ckpt_meta={"model_cfg": {**model_cfg, "num_classes": len(classes)}, "classes": classes,
                       "image_size": table.image_size, "extra": {"data_fingerprint": table.fingerprint, "seed": seed}},
            num_workers=int(ccfg["num_workers"]), amp=bool(ccfg["amp"]), sampler=sampler,
            progress=bool(cfg["progress"]), on_epoch=on_epoch,
        )
        info.update(best_epoch=result.best_epoch, best_val_auc=result.best_val_auc,
                    train_seconds=result.train_seconds, images_per_second=result.images_per_second)
        if not ckpt.is_file():  # no validation improvement was ever recorded: keep the final weights
            save_checkpoint(ckpt, model, model_cfg={**model_cfg, "num_classes": len(classes)}, classes=classes,
                            image_size=table.image_size, metrics={"best_val_auc": result.best_val_auc})
    val = predict(model, val_ds, device=device)
    thresholds = choose_thresholds(val.probs, val.labels)
    test = predict(model, test_ds, device=device)
    metrics = evaluate(test.probs, test.labels, classes, thresholds)
    info.update(test=metrics, val_mean_auc=evaluate(val.probs, val.labels, classes)["mean_auc"],
                seconds=time.perf_counter() - t0, checkpoint=str(ckpt))
    np.savez_compressed(out / f"seed{seed}" / "test_predictions.npz", probs=test.probs, labels=test.labels)
    return info
