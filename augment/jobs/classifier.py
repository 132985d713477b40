"""The classifier work unit: one seed of a classifier on real (+ synthetic) data, a Ray work unit.

Used by ``augment classify`` (every seed), ``augment train`` (the CGAN's pseudo-labeller) and the
searches. Also the rules that pick the real training rows, shared by every model of a run:
``limit_positives`` (the low-data regime) and ``negatives`` (finding vs No Finding).
"""

from __future__ import annotations

import logging
import math
import os
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
from classifiers.classic import ClassicAugment
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
        if int(cap) > len(pos):
            raise UserError(f"classify.limit_positives asks for {int(cap)} {resolve_classes([name])[0]} positives but the "
                            f"train split of data={table.source} has {len(pos)}: use at most {len(pos)} (or all)")
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


def _unit_data(cfg: dict, classes: list[str]) -> tuple[Any, Any, XrayDataset, XrayDataset, XrayDataset]:
    """What every classifier unit trains and is scored on: the table, the device and the train (limited
    positives), validation and test datasets of the selected rows."""
    ccfg = cfg["classify"]
    table = load_table(cfg["data"], show_progress=False)
    device = pick_device(str(ccfg["device"]))
    keep = selected_rows(table, classes, str(ccfg["negatives"]))
    train_ds = XrayDataset(table, keep(limited_train_indices(table, cfg)), classes)
    val_ds = XrayDataset(table, keep(table.indices("val")), classes)
    test_ds = XrayDataset(table, keep(table.indices("test")), classes)
    return table, device, train_ds, val_ds, test_ds


def train_seed(payload: dict, on_epoch: Any = None) -> dict:
    """One seed: train (or load) a classifier, evaluate on test. A Ray work unit (plain dict in/out).

    ``on_epoch(epoch, metrics)`` (in-process only, e.g. a search's pruning callback) is called after
    every validation with ``metrics["val_mean_auc"]``; an exception it raises stops training and
    propagates (after the best weights are restored)."""
    cfg, seed, out = payload["cfg"], int(payload["seed"]), Path(payload["out"])
    ccfg = cfg["classify"]
    classes = payload["classes"]
    table, device, train_ds, val_ds, test_ds = _unit_data(cfg, classes)
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
            progress=bool(cfg["progress"]), on_epoch=on_epoch, augment=classic_augment(ccfg) if ccfg["augment"] else None,
        )
        info.update(best_epoch=result.best_epoch, best_val_auc=result.best_val_auc,
                    train_seconds=result.train_seconds, images_per_second=result.images_per_second)
        if not ckpt.is_file():  # no validation improvement was ever recorded: keep the final weights
            save_checkpoint(ckpt, model, model_cfg={**model_cfg, "num_classes": len(classes)}, classes=classes,
                            image_size=table.image_size, metrics={"best_val_auc": result.best_val_auc})
    val = predict(model, val_ds, device=device)
    thresholds = choose_thresholds(val.probs, val.labels)
    if not ccfg["checkpoint"]:
        store_thresholds(ckpt, thresholds)
    test = predict(model, test_ds, device=device)
    metrics = evaluate(test.probs, test.labels, classes, thresholds)
    info.update(test=metrics, val_mean_auc=evaluate(val.probs, val.labels, classes)["mean_auc"],
                seconds=time.perf_counter() - t0, checkpoint=str(ckpt))
    np.savez_compressed(out / f"seed{seed}" / "test_predictions.npz", probs=test.probs, labels=test.labels)
    return info


def store_thresholds(ckpt: Path, thresholds: np.ndarray) -> None:
    """Add the per-class decision thresholds chosen on validation to a checkpoint (``extra["thresholds"]``),
    atomically: ``augment classify --checkpoint`` scores new data at them."""
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data.setdefault("extra", {})["thresholds"] = [float(t) for t in thresholds]
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, ckpt)


def classic_augment(ccfg: dict) -> ClassicAugment:
    """``classify.classic`` as a :class:`ClassicAugment` (bad values: one line)."""
    ca = ccfg["classic"]
    try:
        return ClassicAugment(degrees=float(ca["degrees"]), translate=float(ca["translate"]), scale=list(ca["scale"]),
                              brightness=float(ca["brightness"]), contrast=float(ca["contrast"]))
    except (TypeError, ValueError) as exc:
        raise UserError(f"classify.classic: {str(exc).splitlines()[0]}") from None


def slot_share(k_batch: int, ratio: float) -> tuple[int, int]:
    """``(real, slot)`` images per step for a nominal batch of ``k_batch`` at synthetic:real ratio r
    (as :class:`MixedBatchSampler` splits it); every arm uses the same real count."""
    k_slot = int(round(k_batch * ratio / (1.0 + ratio)))
    return k_batch - k_slot, k_slot


def oversample_rows(table: DataTable, train_idx: np.ndarray, classes: list[str], generated: list[str],
                    shares: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Real positives of the generated classes (table rows) and their sampling weights: class c
    gets ``shares[c]`` of the slot, spread evenly over its positives (a row positive for two
    generated classes gets both parts)."""
    weights = np.zeros(len(train_idx))
    for c in generated:
        pos = table.column(c)[train_idx] == 1
        n = int(pos.sum())
        if n == 0:
            raise UserError(f"arm oversample: the train split has no {c} positive to repeat "
                            f"(limit_positives or data): drop the oversample arm or {c}")
        weights[pos] += float(shares.get(c, 1.0)) / n
    keep = weights > 0
    return train_idx[keep], weights[keep]


def train_arm(payload: dict) -> dict:
    """One arm x seed (x low-data point) at the step budget ``payload["steps"]``: a work unit.

    Payload: ``cfg`` (plain, resolved; its ``classify.limit_positives`` already the point's), ``seed``,
    ``arm`` (see :mod:`augment.arms`), ``out`` (the unit's folder), ``classes``, ``synthetic`` (folders),
    ``steps``, ``generated`` (classes the oversample slot repeats) and ``shares`` (their slot shares).
    """
    from augment.arms import SPEC

    cfg, seed, arm, out = payload["cfg"], int(payload["seed"]), payload["arm"], Path(payload["out"])
    ccfg = cfg["classify"]
    classes, steps = payload["classes"], int(payload["steps"])
    slot, classic = SPEC[arm]
    classic = classic or bool(ccfg["augment"])
    table, device, train_ds, val_ds, test_ds = _unit_data(cfg, classes)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "best.pt"
    t0 = time.perf_counter()
    batch, ratio, xi = int(ccfg["batch_size"]), float(ccfg["ratio"]), float(ccfg["xi"])
    k_real, k_slot = slot_share(batch, ratio)
    weights = balanced_weights(dataset_labels(train_ds)) if bool(ccfg["balanced"]) else None
    per_eval = max(1, math.ceil(steps / int(ccfg["epochs"])))  # validation every per_eval steps
    real_gen = torch.Generator().manual_seed(seed)  # the real part: the same images in every arm of a seed
    slot_gen = torch.Generator().manual_seed(seed + 1_000_003)
    ds: Any = train_ds
    n_slot = 0
    if slot is None or k_slot == 0:
        sampler = MixedBatchSampler(len(train_ds), 0, batch_size=k_real, ratio=0.0, generator=real_gen,
                                    num_batches=per_eval, real_weights=weights)
    else:
        slot_weights = None
        if slot == "synthetic":
            part = open_synthetic(payload["synthetic"], classes, ccfg["threshold"], table.image_size)
        else:
            rows, slot_weights = oversample_rows(table, train_ds.indices, classes, payload["generated"], payload["shares"])
            part = XrayDataset(table, rows, classes)
        ds, n_slot = MixedDataset(train_ds, part, xi=xi), len(part)
        sampler = MixedBatchSampler(len(train_ds), n_slot, batch_size=batch, ratio=ratio, generator=real_gen,
                                    num_batches=per_eval, real_weights=weights, synthetic_weights=slot_weights,
                                    slot_generator=slot_gen)
        if sampler.n_real_per_batch != k_real:  # pragma: no cover - the two splits are one formula
            raise RuntimeError("real images per step differ between arms")
    model_cfg = dict(cfg["classifier"])
    model = build({**model_cfg, "num_classes": len(classes), "init_seed": seed})
    aug = classic_augment(ccfg) if classic else None
    result = train_classifier(
        model, ds, val_ds, epochs=int(ccfg["epochs"]), batch_size=batch, lr=float(ccfg["lr"]),
        weight_decay=float(ccfg["weight_decay"]), warmup_frac=float(ccfg["warmup_frac"]), device=device, seed=seed,
        balanced=False, patience=None, ckpt_path=ckpt, max_steps=steps, augment=aug,
        ckpt_meta={"model_cfg": {**model_cfg, "num_classes": len(classes)}, "classes": classes,
                   "image_size": table.image_size,
                   "extra": {"data_fingerprint": table.fingerprint, "seed": seed, "arm": arm, "steps": steps}},
        num_workers=int(ccfg["num_workers"]), amp=bool(ccfg["amp"]), sampler=sampler, progress=bool(cfg["progress"]),
    )
    val = predict(model, val_ds, device=device)
    thresholds = choose_thresholds(val.probs, val.labels)
    store_thresholds(ckpt, thresholds)
    test = predict(model, test_ds, device=device)
    np.savez_compressed(out / "test_predictions.npz", probs=test.probs, labels=test.labels)
    return {"arm": arm, "seed": seed, "point": payload.get("point"), "steps": result.steps,
            "real_per_step": k_real, "slot_per_step": k_slot if slot else 0, "classic": classic,
            "n_train_real": len(train_ds), "n_slot": n_slot, "best_epoch": result.best_epoch,
            "best_val_auc": result.best_val_auc, "val_mean_auc": evaluate(val.probs, val.labels, classes)["mean_auc"],
            "test": evaluate(test.probs, test.labels, classes, thresholds), "thresholds": [float(t) for t in thresholds],
            "train_seconds": result.train_seconds, "images_per_second": result.images_per_second,
            "seconds": time.perf_counter() - t0, "checkpoint": str(ckpt)}


class ArmRunner:
    """Arm units in a long-lived worker (:class:`augment.runtime.StatefulPool`): ``run(spec)`` trains
    ``{**payload, **spec}``."""

    def __init__(self, payload: dict) -> None:
        self.payload = payload

    def run(self, spec: dict) -> dict:
        return train_arm({**self.payload, **spec})
