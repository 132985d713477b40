"""`augment search`: Optuna searches over pseudo-labelling, UCGAN and translator settings.

The only module that touches ``optuna.Trial``. Every search space lives in :data:`SPACES`: a
``suggest`` function that turns a trial into Hydra override strings, the objective directions, a
``prepare`` step run once before the trials (a synthetic pool, a feature extractor) and an
``objective`` that composes the trial's config with :func:`augment.config.compose` and runs the
existing stage functions on it. The ranges come from ``configs/search/<space>.yaml``.

Spaces:

* ``pseudo_label``: threshold ``t``, synthetic:real ratio ``r``, synthetic loss weight ``xi``. A pool is
  generated once by the CGAN at ``t = threshold.low`` (its ``p_<class>`` columns stored), every trial
  relabels it at its own ``t`` when it is loaded (``classify.threshold``), trains the classifier on real
  + pool and returns the validation mean AUC. Trials are pruned on the per-epoch validation AUC.
* ``ucgan_weights``: UCGAN's alpha, beta, gamma, eta, xi and learning rates. Each trial trains a short
  UCGAN, generates a small pool labelled by its C, trains the classifier on real + pool; two objectives:
  validation mean AUC (maximize) and the pool's domain FID against real training images (minimize),
  NSGA-II, Pareto front reported.
* ``translator_weights``: the translator's loss weights (``lambda_cyc``, ``lambda_id``, ``lambda_sparse``,
  whichever the family has) and the fixed mask threshold, scored by the mask Dice on the validation
  split's ground-truth lesion masks.

Storage is a SQLite file in the run folder unless ``--storage URL`` names another database
(PostgreSQL for many machines); the same command with the same ``--out`` continues the study.
``--workers N`` runs N trial loops at once as Ray actors (one GPU each where there are GPUs), each
calling ``study.optimize`` against the shared storage. A trial that raises or returns NaN is stored as
FAIL and the study goes on; Ctrl-C stops after marking the running trial FAIL, and writes the outputs
of what is stored. The outputs: ``best.yaml`` (the best trial's overrides; apply them with
``augment <command> --from-search best.yaml``), ``metrics.json``, ``trials.csv`` and PNG plots.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from omegaconf import DictConfig

from augment import runtime
from augment.config import compose, save_config, to_dict
from augment.errors import UserError
from augment.stages.common import markdown_table, resolve_classes, versions, write_json

log = logging.getLogger(__name__)

BEST_FILE = "best.yaml"
FAMILY_KEYS = ("generator", "translator")

# Per-process cache of things a worker loads once (tables, feature extractors); never RNG state.
_CACHE: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def override_key(item: str) -> str:
    return item.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for item in group:
            key = override_key(item)
            merged.pop(key, None)
            merged[key] = item
    return list(merged.values())


def quote(path: str | os.PathLike) -> str:
    """A path as a quoted Hydra value (paths may hold characters the grammar reserves)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _num(x: float) -> str:
    return repr(float(x))


def strip_families(overrides: Sequence[str]) -> list[str]:
    """Without ``generator=...`` / ``translator=...`` (family choices a stage re-selects itself)."""
    return [o for o in overrides if override_key(o) not in FAMILY_KEYS]


# --------------------------------------------------------------------------------------------
# The spaces
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """One search space.

    Attributes:
        name: the ``search=<name>`` option.
        metrics: names of the objective values, in order.
        directions: ``"maximize"`` / ``"minimize"`` per metric.
        params: parameter names the space may search (ranges in the config's ``search.params``).
        suggest: ``(trial, ranges, base_cfg) -> overrides``: the trial's Hydra overrides.
        defaults: ``(base_cfg) -> {param: value}``: the base config's own values (the first trial).
        prepare: ``(base_cfg, out, base_overrides, ctx) -> None``: once per run on the driver; fills
            ``ctx`` (plain data sent to the workers).
        objective: ``(trial, overrides, ctx) -> {"values": [...], "attrs": {...}}``.
        fixed: overrides every trial adds before its own (e.g. ``generator=ucgan``).
        applies_to: the commands ``best.yaml`` is meant for (printed in it).
    """

    name: str
    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    params: tuple[str, ...]
    suggest: Callable[[Any, dict, dict], list[str]]
    defaults: Callable[[dict], dict[str, float]]
    prepare: Callable[[DictConfig, Path, list[str], dict], None]
    objective: Callable[[Any, list[str], dict], dict]
    fixed: tuple[str, ...] = ()
    applies_to: str = ""

    @property
    def multi(self) -> bool:
        return len(self.directions) > 1


def _float(trial: optuna.Trial, ranges: dict, name: str) -> float:
    spec = ranges[name]
    return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))


# --- pseudo_label -----------------------------------------------------------------------------


def suggest_pseudo_label(trial: optuna.Trial, ranges: dict, base: dict) -> list[str]:
    t = _float(trial, ranges, "threshold")
    r = _float(trial, ranges, "ratio")
    xi = _float(trial, ranges, "xi")
    return [f"classify.threshold={_num(t)}", f"classify.ratio={_num(r)}", f"classify.xi={_num(xi)}"]


def defaults_pseudo_label(base: dict) -> dict[str, float]:
    return {"threshold": base["generate"]["threshold"], "ratio": base["classify"]["ratio"], "xi": base["classify"]["xi"]}


def prepare_pseudo_label(cfg: DictConfig, out: Path, base: list[str], ctx: dict) -> None:
    """Trained models (``search.models`` or trained here), the pool at ``t = threshold.low``, and the
    real-only baseline."""
    from augment.stages.generate import generate, sha256

    scfg = cfg.search
    t_low = float(scfg.params.threshold.low)
    if scfg.get("pool"):  # a pool generated before (augment generate --threshold <= threshold.low)
        pool = Path(str(scfg.pool)).expanduser().resolve()
        _check_pool(cfg, pool, ctx["classes"], t_low)
        ctx.update(pool=str(pool), pool_sha256=sha256(pool / "labels.csv"), pool_threshold=t_low)
        if bool(scfg.get("baseline", False)):
            ctx["baseline"] = _real_only(cfg, out / "baseline", ctx, "real-only baseline")
        return
    models = _cgan_models(cfg, out, base, ctx["classes"])
    pool = out / "pool"
    if pool.exists() and (not (pool / "dataset.json").is_file() or (pool / ".shards").exists()):
        shutil.rmtree(pool)  # an unfinished pool (maybe at another t) is made again from scratch
    if not pool.exists():
        gen_overrides = merge_overrides(strip_families(base), [
            f"generate.models={quote(models)}", "generate.sampler=cgan", "generate.translator=none",
            f"generate.threshold={_num(t_low)}", f"generate.n={int(scfg.pool_n)}", "generate.per_class=false",
            "generate.resume=true", "generate.overwrite=false", "generate.labeller=auto",
            "generate.allow_short=true", f"classes=[{','.join(ctx['classes'])}]"])
        print(f"search: generating the synthetic pool ({int(scfg.pool_n)} images at t={t_low}) into {pool}")
        generate(compose(gen_overrides), pool)
    card = json.loads((pool / "dataset.json").read_text())
    if not math.isclose(float(card.get("threshold", t_low)), t_low):
        raise UserError(f"the pool in {pool} was generated at t={card.get('threshold')} but "
                        f"search.params.threshold.low={t_low}: keep the lower bound or use a new --out")
    ctx.update(pool=str(pool.resolve()), pool_sha256=sha256(pool / "labels.csv"), pool_threshold=t_low,
               models=str(models))
    if bool(scfg.get("baseline", False)):
        ctx["baseline"] = _real_only(cfg, out / "baseline", ctx, "real-only baseline")


def _check_pool(cfg: DictConfig, pool: Path, classes: list[str], t_low: float) -> None:
    from augment.data.sources import load_table
    from augment.stages.classify import open_synthetic

    if not (pool / "labels.csv").is_file():
        raise UserError(f"search.pool={pool} has no labels.csv: pass a folder written by `augment generate`")
    open_synthetic([str(pool)], classes, t_low, load_table(cfg.data, show_progress=False).image_size)
    card = json.loads((pool / "dataset.json").read_text()) if (pool / "dataset.json").is_file() else {}
    made_at = card.get("threshold")
    if made_at is not None and float(made_at) > t_low + 1e-12:
        raise UserError(f"search.pool={pool} was generated at t={made_at}, above search.params.threshold.low={t_low}: "
                        f"images below {made_at} were never kept; raise the lower bound to {made_at} or generate "
                        f"the pool with --threshold {t_low}")


def objective_pseudo_label(trial: optuna.Trial, overrides: list[str], ctx: dict) -> dict:
    cfg = to_dict(compose(overrides))
    folder = trial_dir(ctx, trial)
    info = _classify(cfg, ctx, folder, [ctx["pool"]], on_epoch=pruning_callback(trial) if ctx["prune"] else None)
    return {"values": [_finite(info.get("val_mean_auc"))], "attrs": _classify_attrs(info)}


# --- ucgan_weights ----------------------------------------------------------------------------

UCGAN_PARAMS = ("alpha", "beta", "gamma", "eta", "xi", "lr_g", "lr_d", "lr_c")


def suggest_ucgan(trial: optuna.Trial, ranges: dict, base: dict) -> list[str]:
    return [f"generator.{name}={_num(_float(trial, ranges, name))}" for name in UCGAN_PARAMS]


def defaults_ucgan(base: dict) -> dict[str, float]:
    return {name: base["generator"][name] for name in UCGAN_PARAMS}  # base has generator=ucgan (Space.fixed)


def prepare_ucgan(cfg: DictConfig, out: Path, base: list[str], ctx: dict) -> None:
    """The domain-FID feature extractor (a real-only classifier) and the real features, once."""
    from augment.data.sources import load_table
    from augment.metrics.fid import features
    from augment.stages.generate import sha256
    from augment.stages.train import training_rows

    scfg = cfg.search
    ckpt = None
    if scfg.get("models"):
        from augment.stages.train import find_models

        models = find_models(str(scfg.models))
        hits = sorted((models / "models" / "classifier").glob("**/best.pt"))
        if not hits:
            raise UserError(f"search.models={scfg.models} has no classifier for the FID features "
                            "(models/classifier/**/best.pt): train one with `augment train` or leave search.models empty")
        ckpt = hits[0]
    else:
        info = _real_only(cfg, out / "fid-extractor", ctx, "FID feature extractor", keep=True)
        ckpt = Path(info["checkpoint"])
    digest = sha256(ckpt)
    table = load_table(cfg.data, show_progress=False)
    rows = training_rows(table, ctx["classes"])
    n = min(int(scfg.fid_images), len(rows))
    if n < 2:
        raise UserError(f"only {len(rows)} real training image(s) for the FID reference: use more data")
    rows = np.sort(np.random.default_rng([int(scfg.seed), 11]).choice(rows, size=n, replace=False))
    feats_path = out / "fid" / "real_features.npy"
    meta_path = feats_path.with_suffix(".json")
    meta = {"extractor_sha256": digest, "rows": rows.tolist(), "data_fingerprint": table.fingerprint}
    if not (feats_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta):
        extractor = _extractor(str(ckpt), digest, ctx["device"])
        feats = features(extractor, table.images[rows][:, None], batch_size=64)
        feats_path.parent.mkdir(parents=True, exist_ok=True)
        np.save(feats_path, feats)
        write_json(meta_path, meta)
    pool_t = scfg.get("pool_threshold")
    ctx.update(extractor=str(ckpt), extractor_sha256=digest, real_features=str(feats_path.resolve()),
               fid_images=n, pool_n=int(scfg.pool_n),
               pool_threshold=float(cfg.generate.threshold if pool_t is None else pool_t))


def objective_ucgan(trial: optuna.Trial, overrides: list[str], ctx: dict) -> dict:
    from augment.metrics.fid import features, fid_from_features, iter_folder_batches, list_images
    from augment.stages.generate import generate
    from augment.stages.train import train_one as train_model

    folder = trial_dir(ctx, trial)
    cfg = compose(overrides)
    models = folder / "models"
    train_model({"cfg": to_dict(cfg), "kind": "generator", "family": "ucgan", "classes": ctx["classes"],
                 "out": str(models / "ucgan")})
    pool = folder / "pool"
    generate(compose(merge_overrides(overrides, [
        f"generate.models={quote(folder)}", "generate.sampler=ucgan", "generate.translator=none",
        "generate.labeller=auto", f"generate.n={ctx['pool_n']}", f"generate.threshold={_num(ctx['pool_threshold'])}",
        "generate.per_class=false", "generate.workers=1", "generate.resume=true",
        f"classes=[{','.join(ctx['classes'])}]"])), pool)
    info = _classify(to_dict(cfg), ctx, folder / "classifier", [str(pool)])
    extractor = _extractor(ctx["extractor"], ctx["extractor_sha256"], ctx["device"])
    fake = features(extractor, iter_folder_batches(list_images(pool / "images"), 64, num_workers=0), batch_size=64)
    real = np.load(ctx["real_features"])
    fid = fid_from_features(real, fake, extractor_id=extractor.id)
    attrs = {**_classify_attrs(info), "fid_n_real": int(fid.n1), "fid_n_fake": int(fid.n2), "fid_extractor": extractor.id}
    return {"values": [_finite(info.get("val_mean_auc")), _finite(fid.value)], "attrs": attrs}


# --- translator_weights -----------------------------------------------------------------------

TRANSLATOR_PARAMS = ("lambda_cyc", "lambda_id", "lambda_sparse")


def suggest_translator(trial: optuna.Trial, ranges: dict, base: dict) -> list[str]:
    out = []
    for name in TRANSLATOR_PARAMS:  # only the weights this family has
        if name in base["translator"] and name in ranges:
            out.append(f"translator.{name}={_num(_float(trial, ranges, name))}")
    out += ["mask.rule=fixed", f"mask.threshold={_num(_float(trial, ranges, 'mask_threshold'))}"]
    return out


def defaults_translator(base: dict) -> dict[str, float]:
    values = {name: base["translator"][name] for name in TRANSLATOR_PARAMS if name in base["translator"]}
    return {**values, "mask_threshold": base["mask"]["threshold"]}


def prepare_translator(cfg: DictConfig, out: Path, base: list[str], ctx: dict) -> None:
    """The validation images that have a finding with a ground-truth mask (at most ``val_images``)."""
    from augment.data.sources import load_table
    from augment.data.table import select_labels

    table = load_table(cfg.data, show_progress=False)
    classes = ctx["classes"]
    val = table.indices("val")
    labels = np.nan_to_num(select_labels(table.labels[val], classes)) > 0.5
    known = np.stack([table.lesion_known[c][val] if c in table.lesion_known else np.zeros(len(val), bool)
                      for c in classes], 1)
    rows = val[(labels & known).any(1)][: int(cfg.search.val_images)]
    if len(rows) == 0:
        raise UserError(f"no validation image of {', '.join(classes)} in data={table.source} has a ground-truth mask: "
                        "translator_weights needs lesion masks (data=phantom, or a folder source with masks)")
    ctx.update(val_rows=[int(r) for r in rows], family=str(cfg.choices.translator))


def objective_translator(trial: optuna.Trial, overrides: list[str], ctx: dict) -> dict:
    import torch

    from augment.metrics.masks import dice, iou, poi
    from augment.stages.train import load_model
    from augment.stages.train import train_one as train_model
    from generators.masks import MaskRuleError, diff_to_mask

    folder = trial_dir(ctx, trial)
    cfg = compose(overrides)
    family = str(cfg.choices.translator)
    ckpt_dir = folder / "models" / family
    train_model({"cfg": to_dict(cfg), "kind": "translator", "family": family, "classes": ctx["classes"],
                 "out": str(ckpt_dir)})
    system, ck = load_model(ckpt_dir / "checkpoint.pt")
    device = torch.device(ctx["device"])
    system.to(device)
    table = _table(to_dict(cfg)["data"])
    rows = np.asarray(ctx["val_rows"], dtype=np.int64)
    tclasses = list(ck["classes"])
    from augment.data.table import select_labels

    labels = np.nan_to_num(select_labels(table.labels[rows], tclasses)) > 0.5
    mask_kw = {"rule": "fixed", "threshold": float(cfg.mask.threshold), "min_area": int(cfg.mask.min_area),
               "smooth_sigma": float(cfg.mask.smooth_sigma)}
    scores: dict[str, list[np.ndarray]] = {"dice": [], "iou": [], "poi": []}
    empty = 0
    for j, c in enumerate(tclasses):  # remove one finding at a time (single-finding images go to No Finding)
        have = np.nonzero(labels[:, j] & table.lesion_known.get(c, np.zeros(len(table), bool))[rows])[0]
        for start in range(0, len(have), 64):
            sel = have[start:start + 64]
            x = torch.from_numpy(np.asarray(table.images[rows[sel]], dtype=np.float32)[:, None] / 127.5 - 1).to(device)
            target = torch.from_numpy(labels[sel].astype(np.float32)).to(device)
            target[:, j] = 0
            with torch.no_grad():
                diff = system.translate(x, target).diff_map
            try:
                pred = diff_to_mask(diff.cpu().numpy(), finding=c, **mask_kw)
            except MaskRuleError:  # nothing above the threshold in the whole batch: empty masks
                pred = np.zeros(tuple(diff.shape), dtype=np.uint8)
                empty += len(sel)
            gt = np.asarray(table.lesion_masks[c][rows[sel]], dtype=np.uint8)[:, None]
            lesion = gt.reshape(len(gt), -1).any(1)
            if lesion.any():
                scores["dice"].append(dice(pred[lesion], gt[lesion]))
                scores["iou"].append(iou(pred[lesion], gt[lesion]))
                scores["poi"].append(poi(pred[lesion], gt[lesion]))
    if not scores["dice"]:
        raise ValueError("no validation lesion to score")
    mean = {k: float(np.mean(np.concatenate(v))) for k, v in scores.items()}
    return {"values": [mean["dice"]], "attrs": {"val_iou": mean["iou"], "val_poi": mean["poi"],
                                                "n_pairs": int(sum(len(v) for v in scores["dice"])),
                                                "empty_batches_images": empty, "family": family}}


SPACES: dict[str, Space] = {
    "pseudo_label": Space(
        "pseudo_label", ("val_mean_auc",), ("maximize",), ("threshold", "ratio", "xi"),
        suggest_pseudo_label, defaults_pseudo_label, prepare_pseudo_label, objective_pseudo_label,
        applies_to="augment classify --from-search best.yaml (real + the search's pool at the best t, r, xi); "
                   "augment generate / augment run --from-search best.yaml (t, r, xi for a new synthetic set)"),
    "ucgan_weights": Space(
        "ucgan_weights", ("val_mean_auc", "fid"), ("maximize", "minimize"), UCGAN_PARAMS,
        suggest_ucgan, defaults_ucgan, prepare_ucgan, objective_ucgan, fixed=("generator=ucgan",),
        applies_to="augment train --from-search best.yaml (trains the UCGAN with these weights)"),
    "translator_weights": Space(
        "translator_weights", ("val_dice",), ("maximize",), (*TRANSLATOR_PARAMS, "mask_threshold"),
        suggest_translator, defaults_translator, prepare_translator, objective_translator,
        applies_to="augment train --from-search best.yaml, then augment generate --from-search best.yaml (mask rule)"),
}


# --------------------------------------------------------------------------------------------
# Trial helpers
# --------------------------------------------------------------------------------------------


def pruning_callback(trial: optuna.Trial) -> Callable[[int, dict], None]:
    """``on_epoch`` for the classifier loop: report the validation AUC, prune when told to."""

    def on_epoch(epoch: int, metrics: dict) -> None:
        value = metrics.get("val_mean_auc")
        if value is None or not math.isfinite(float(value)):
            return
        trial.report(float(value), step=int(epoch))
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} (val mean AUC {float(value):.4f})")

    return on_epoch


def trial_dir(ctx: dict, trial: optuna.Trial) -> Path:
    path = Path(ctx["out"]) / "trials" / f"{trial.number:04d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _finite(value: Any) -> float:
    return math.nan if value is None else float(value)


def _classify(cfg: dict, ctx: dict, folder: Path, synthetic: list[str], on_epoch: Callable | None = None) -> dict:
    from augment.stages.classify import train_one

    return train_one({"cfg": cfg, "seed": int(ctx["classify_seed"]), "out": str(folder), "classes": ctx["classes"],
                      "synthetic": synthetic}, on_epoch=on_epoch)


def _classify_attrs(info: dict) -> dict:
    return {"test_mean_auc": info["test"]["mean_auc"], "best_epoch": info.get("best_epoch"),
            "n_train_synthetic": info.get("n_train_synthetic", 0), "n_train_real": info.get("n_train_real")}


def _real_only(cfg: DictConfig, folder: Path, ctx: dict, what: str, keep: bool = False) -> dict:
    """A real-only classifier (same settings and seed as the trials), trained once and cached."""
    done = folder / "result.json"
    if done.is_file():
        info = json.loads(done.read_text())
        if not keep or Path(info.get("checkpoint", "")).is_file():
            return info
    print(f"search: training the {what} (real only) into {folder}")
    info = _classify(to_dict(cfg), ctx, folder, [])
    result = {"val_mean_auc": info.get("val_mean_auc"), "test_mean_auc": info["test"]["mean_auc"],
              "best_epoch": info.get("best_epoch"), "checkpoint": info["checkpoint"], "seed": info["seed"]}
    if not keep and not ctx.get("keep_checkpoints"):
        _drop_checkpoints(folder)
    write_json(done, result)
    return result


def _cgan_models(cfg: DictConfig, out: Path, base: list[str], classes: list[str]) -> Path:
    """A train run with a cgan sampler and its classifier: ``search.models``, or trained into
    ``<out>/models-run`` once."""
    from augment.stages.train import find_models, train

    scfg = cfg.search
    if scfg.get("models"):
        models = find_models(str(scfg.models))
        if not (models / "models" / "cgan" / "checkpoint.pt").is_file():
            raise UserError(f"search.models={scfg.models} has no cgan sampler: train one with "
                            "`augment train generator=cgan` or leave search.models empty to train it here")
        return models
    run = out / "models-run"
    done = run / "metrics.json"
    if not done.is_file():
        overrides = merge_overrides(strip_families(base), ["generator=cgan", "train.labeller=true",
                                                           f"classes=[{','.join(classes)}]"])
        tcfg = compose(overrides)
        print(f"search: training the cgan sampler and its pseudo-labeller into {run}")
        run.mkdir(parents=True, exist_ok=True)
        save_config(tcfg, run / "config.yaml")
        result = train(tcfg, run, overrides=overrides)
        write_json(done, {"command": "train", **result})
    return run.resolve()


def _drop_checkpoints(folder: Path) -> None:
    for p in folder.rglob("*.pt"):
        p.unlink(missing_ok=True)


def _table(data_cfg: dict) -> Any:
    from augment.data.sources import load_table

    key = "table:" + json.dumps(data_cfg, sort_keys=True, default=str)
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = load_table(data_cfg, show_progress=False)
    return _CACHE[key]


def _extractor(ckpt: str, digest: str, device: str) -> Any:
    from augment.metrics.fid import DomainExtractor
    from classifiers.model import load_classifier

    key = f"extractor:{ckpt}:{digest}:{device}"
    if key not in _CACHE:
        model, _ = load_classifier(ckpt, map_location=device)
        _CACHE[key] = DomainExtractor(model, sha256=digest)
    return _CACHE[key]


def compose_cached(overrides: list[str]) -> dict:
    key = "cfg:" + "\x00".join(overrides)
    if key not in _CACHE:
        _CACHE[key] = to_dict(compose(overrides))
    return _CACHE[key]


# --------------------------------------------------------------------------------------------
# Study, samplers, pruners, storage
# --------------------------------------------------------------------------------------------


def redact(url: str) -> str:
    """The storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given (it has no password to hide)
        return url


def make_storage(url: str, heartbeat: float | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for locks (several workers write to one file); a heartbeat lets
    the next trial mark a dead worker's trial FAIL. Bad URLs become one-line UserErrors."""
    kwargs: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine["connect_args"] = {"timeout": 120}
    if heartbeat:
        kwargs.update(heartbeat_interval=int(heartbeat), grace_period=int(2 * heartbeat))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, engine_kwargs=engine or None, **kwargs)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors of every kind: one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open the study storage {redact(url)} ({type(exc).__name__}: {first[:200]}): "
                        "pass a reachable SQLAlchemy URL to --storage (sqlite:///path/study.db, "
                        "postgresql://user:pw@host/db with its driver installed) or leave it out") from None


def make_sampler(space: Space, scfg: dict, seed: int) -> optuna.samplers.BaseSampler:
    if space.multi:
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, int(scfg["population_size"])))
    if scfg["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(scfg["startup_trials"]))


def make_pruner(space: Space, scfg: dict, epochs: int) -> optuna.pruners.BasePruner:
    name = str(scfg["pruner"] or "none")
    if space.multi or name == "none":
        return optuna.pruners.NopPruner()
    first = int(scfg["warmup_epochs"]) + 1  # epochs count from 1: the first prunable epoch
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min(first, max(1, epochs)), max_resource=max(1, epochs),
                                              reduction_factor=3)
    return optuna.pruners.MedianPruner(n_startup_trials=int(scfg["startup_trials"]), n_warmup_steps=first)


def open_study(url: str, name: str, space: Space) -> optuna.Study:
    """Create or load the study; refuse one that exists with other directions or another space."""
    storage = make_storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(space.directions),
                                    load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - database errors surface here on first contact
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot open study '{name}' in {redact(url)} ({first[:200]}): check --storage") from None
    have = [d.name.lower() for d in study.directions]
    if have != list(space.directions):
        raise UserError(f"study '{name}' in {redact(url)} exists with direction(s) {', '.join(have)} but "
                        f"search={space.name} needs {', '.join(space.directions)}: pass another --study NAME")
    stored_space = study.user_attrs.get("space")
    if stored_space is not None and stored_space != space.name:
        raise UserError(f"study '{name}' in {redact(url)} holds the {stored_space} space, not {space.name}: "
                        f"pass another --study NAME (or search={stored_space})")
    if stored_space is None:
        study.set_user_attr("space", space.name)
    return study


def check_ranges(space: Space, ranges: dict) -> dict:
    """The ranges of ``space``'s parameters, validated. Ranges of another space's parameters are left
    out (an experiment may set them, e.g. experiment=smoke sets the pseudo-label threshold); a name
    that no space searches is an error."""
    ranges = {n: r for n, r in ranges.items()
              if n in space.params or not any(n in other.params for other in SPACES.values())}
    unknown = sorted(set(ranges) - set(space.params))
    if unknown:
        raise UserError(f"search.params has {', '.join(unknown)}, not a parameter of search={space.name} "
                        f"(it searches {', '.join(space.params)})")
    missing = [p for p in space.params if p not in ranges and p not in TRANSLATOR_PARAMS]
    if missing:
        raise UserError(f"search.params lacks a range for {', '.join(missing)}: add search.params.{missing[0]}="
                        "{low: ..., high: ...}")
    for name, spec in ranges.items():
        try:
            low, high, log_ = float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"search.params.{name} must be {{low: <number>, high: <number>, log: <bool>}}, got {spec}") from None
        if not low < high:
            raise UserError(f"search.params.{name}: low={low} is not below high={high}: swap or widen the range")
        if log_ and low <= 0:
            raise UserError(f"search.params.{name}: a log range needs low > 0 (got {low}): raise low or set log=false")
    if space.name == "pseudo_label":
        t = ranges["threshold"]
        if not (0 < float(t["low"]) and float(t["high"]) < 1):
            raise UserError(f"search.params.threshold must lie inside (0, 1), got [{t['low']}, {t['high']}]")
    return ranges


# --------------------------------------------------------------------------------------------
# The worker: one trial loop against the shared storage
# --------------------------------------------------------------------------------------------


def run_worker(payload: dict) -> dict:
    """One trial loop (a Ray work unit, or called in this process): ``study.optimize`` on the shared
    study for ``payload["n_trials"]`` trials. Plain dict in, plain dict out."""
    space = SPACES[payload["space"]]
    scfg = payload["search"]
    ctx = dict(payload["context"])
    base = list(payload["base"])
    fixed = merge_overrides(list(space.fixed), list(scfg.get("overrides") or []))
    base_cfg = compose_cached(merge_overrides(base, fixed))
    pruner = make_pruner(space, scfg, int(base_cfg["classify"]["epochs"]))
    ctx["prune"] = not isinstance(pruner, optuna.pruners.NopPruner)
    ctx.setdefault("device", _device(base_cfg))
    storage = make_storage(payload["storage"], scfg.get("heartbeat"))
    study = optuna.load_study(study_name=payload["study"], storage=storage,
                              sampler=make_sampler(space, scfg, int(payload["sampler_seed"])), pruner=pruner)
    host, pid = socket.gethostname(), os.getpid()
    ran: list[int] = []

    def objective(trial: optuna.Trial) -> float | list[float]:
        ran.append(trial.number)
        trial.set_user_attr("worker", f"{host}:{pid}")
        trial.set_user_attr("worker_pid", pid)
        trial.set_user_attr("worker_rank", int(payload["rank"]))
        trial.set_user_attr("session", payload["session"])
        try:
            space_overrides = space.suggest(trial, scfg["params"], base_cfg)
            trial.set_user_attr("overrides", space_overrides)
            result = space.objective(trial, merge_overrides(base, fixed, space_overrides), ctx)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc).strip()[:500]}")
            raise
        finally:
            if not ctx.get("keep_checkpoints"):
                _drop_checkpoints(Path(ctx["out"]) / "trials" / f"{trial.number:04d}")
        for key, value in (result.get("attrs") or {}).items():
            trial.set_user_attr(key, value)
        values = [float(v) for v in result["values"]]
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("error", f"objective value not finite: {values}")
        return values if space.multi else values[0]

    study.optimize(objective, n_trials=int(payload["n_trials"]), timeout=payload.get("timeout"),
                   catch=(Exception,), gc_after_trial=True)
    return {"rank": payload["rank"], "pid": pid, "host": host, "trials": ran}


def _device(cfg: dict) -> str:
    import torch

    want = str(cfg["classify"].get("device", "auto"))
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def search(cfg: DictConfig, out: Path, overrides: list[str] | None = None) -> dict:
    """The ``augment search`` stage."""
    scfg = cfg.search
    name = scfg.get("space")
    if not name:
        raise UserError(f"no search space: pass search=<space> (one of {', '.join(SPACES)})")
    if name not in SPACES:
        raise UserError(f"unknown search space '{name}': choose one of {', '.join(SPACES)} (search=<space>)")
    space = SPACES[name]
    n_trials, workers = int(scfg.n_trials), int(scfg.workers)
    if n_trials < 1:
        raise UserError(f"--trials {n_trials}: run at least one trial")
    if workers < 1:
        raise UserError(f"--workers {workers}: use at least one worker")
    timeout = None if scfg.timeout is None else float(scfg.timeout)
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout {scfg.timeout}: give a positive number of seconds")
    if str(scfg.pruner) not in ("median", "hyperband", "none") or str(scfg.sampler) not in ("tpe", "random"):
        raise UserError(f"search.pruner={scfg.pruner} / search.sampler={scfg.sampler}: pruner is median, hyperband "
                        "or none; sampler is tpe or random")
    ranges = check_ranges(space, to_dict(scfg.params))
    resolve_classes(cfg.classes)
    inline = runtime.is_inline(cfg.runtime) or workers == 1
    if workers > 1 and not runtime.is_inline(cfg.runtime):
        res = runtime.resources(cfg.runtime)
        if workers > res["CPU"]:
            raise UserError(f"--workers {workers} is more than the {res['CPU']:g} CPU(s) Ray can use here: pass "
                            f"--workers {max(1, int(res['CPU']))} or fewer, or run on a cluster (runtime=cluster)")
        need = workers * runtime.gpus_per_worker(cfg.runtime)
        if res["GPU"] > 0 and need > res["GPU"]:
            raise UserError(f"--workers {workers} needs {need:g} GPU(s) but {res['GPU']:g} are available: pass "
                            f"--workers {int(res['GPU'] / max(runtime.gpus_per_worker(cfg.runtime), 1e-9))} or fewer, "
                            "or share GPUs with runtime.gpus_per_worker=0.5")
    out = out.resolve()
    url = str(scfg.storage) if scfg.storage else f"sqlite:///{out / 'study.db'}"
    study_name = str(scfg.study or name)
    study = open_study(url, study_name, space)
    before = len(study.get_trials(deepcopy=False))

    base = [o for o in (overrides or []) if not (override_key(o) in FAMILY_KEYS and "," in o)]
    fixed = merge_overrides(list(space.fixed), list(scfg.overrides or []))
    base_cfg = compose(merge_overrides(base, fixed))
    from augment.data.sources import load_table

    table = load_table(base_cfg.data, show_progress=bool(cfg.progress))
    classes = resolve_classes(base_cfg.classes, table, allow_no_finding=False)
    seeds = list(base_cfg.classify.seeds or [0])
    ctx: dict[str, Any] = {"out": str(out), "classes": classes, "classify_seed": int(seeds[0]),
                           "data_fingerprint": table.fingerprint,
                           "keep_checkpoints": bool(scfg.keep_checkpoints), "device": _device(to_dict(base_cfg))}
    print(f"search {name}: study '{study_name}' in {redact(url)} ({before} trial(s) stored), "
          f"{n_trials} more on {workers} worker(s), classes {', '.join(classes)}")
    space.prepare(base_cfg, out, merge_overrides(base, fixed), ctx)
    for key in ("data_fingerprint", "pool_sha256", "extractor_sha256"):
        if key in ctx:
            stored = study.user_attrs.get(key)
            if stored is not None and stored != ctx[key]:
                log.warning("this run's %s differs from the one the study's earlier trials used: trials are "
                            "comparable only on the same data, pool and extractor (pass search.models=<shared run>)", key)
            elif stored is None:
                study.set_user_attr(key, ctx[key])
    if before == 0 and bool(scfg.enqueue_defaults):
        start = _in_range(space.defaults(to_dict(base_cfg)), ranges)
        if start:
            study.enqueue_trial(start, user_attrs={"enqueued": "the base config's values"})

    session = uuid.uuid4().hex[:12]
    ranks = 1 if inline else workers
    shares = [n_trials // ranks + (1 if k < n_trials % ranks else 0) for k in range(ranks)]
    context = {k: v for k, v in ctx.items() if k != "device"}  # each worker picks its own device
    payloads = [{"space": name, "search": to_dict(scfg), "context": context, "base": base, "storage": url,
                 "study": study_name, "n_trials": share, "timeout": timeout, "rank": k, "session": session,
                 "sampler_seed": int(scfg.seed) + k + 7919 * before}  # a rerun does not repeat the startup points
                for k, share in enumerate(shares) if share > 0]
    if inline and workers > 1:
        print(f"search: runtime={cfg.runtime.name}: the {workers} workers run as one loop in this process")
    t0 = time.perf_counter()
    interrupted = False
    try:
        if inline:
            results = [run_worker(p) for p in payloads]
        else:
            results = runtime.run_all("augment.search:run_worker", payloads, cfg.runtime)
    except KeyboardInterrupt:
        interrupted = True
        results = []
        _fail_running(study, session)
        print(f"search: interrupted; the study keeps its finished trials: rerun the same command (--out {out}) "
              "to continue")
    seconds = time.perf_counter() - t0
    return summarize(study, space, out, url, ctx, {
        "seconds": seconds, "interrupted": interrupted, "workers": workers, "requested_trials": n_trials,
        "stored_before": before, "worker_results": results, "session": session, "runtime": str(cfg.runtime.name)})


def _in_range(values: dict[str, Any], ranges: dict) -> dict[str, float]:
    """The values that lie inside their search range (others are left to the sampler)."""
    out = {}
    for name, value in values.items():
        if name in ranges and value is not None and float(ranges[name]["low"]) <= float(value) <= float(ranges[name]["high"]):
            out[name] = float(value)
    return out


def _fail_running(study: optuna.Study, session: str) -> None:
    """Mark this session's trials that were still running (their workers were stopped) as FAIL."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("session") == session:
            try:
                study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (Ctrl-C)")
                study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except Exception as exc:  # noqa: BLE001 - finished in the meantime; leave it
                log.debug("trial %d: %s", t.number, exc)


# --------------------------------------------------------------------------------------------
# Outputs: best.yaml, plots, trials.csv, metrics
# --------------------------------------------------------------------------------------------


def _trial_record(t: optuna.trial.FrozenTrial, space: Space) -> dict:
    values = dict(zip(space.metrics, t.values)) if t.values else None
    attrs = {k: v for k, v in t.user_attrs.items() if k not in ("overrides",)}
    return {"trial": t.number, "state": t.state.name, "values": values, "params": dict(t.params),
            "overrides": list(t.user_attrs.get("overrides") or []), "attrs": attrs,
            "start": t.datetime_start.isoformat() if t.datetime_start else None,
            "complete": t.datetime_complete.isoformat() if t.datetime_complete else None}


def best_trial(study: optuna.Study, space: Space) -> optuna.trial.FrozenTrial | None:
    """The best trial; for several objectives the Pareto-optimal trial with the best first objective."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    if not space.multi:
        return study.best_trial
    front = study.best_trials
    sign = 1 if space.directions[0] == "maximize" else -1
    return max(front, key=lambda t: sign * t.values[0])


def best_overrides(t: optuna.trial.FrozenTrial, space: Space, ctx: dict) -> list[str]:
    overrides = list(t.user_attrs.get("overrides") or [])
    if space.name == "pseudo_label":
        t = [o for o in overrides if o.startswith("classify.threshold=")]
        if t:  # the same t for new synthetic sets (augment generate / augment run)
            overrides.append("generate.threshold=" + t[0].split("=", 1)[1])
        if ctx.get("pool"):
            overrides.append(f"classify.synthetic=[{quote(ctx['pool'])}]")
    if space.name == "translator_weights" and ctx.get("family"):
        overrides.insert(0, f"translator={ctx['family']}")
    return list(space.fixed) + overrides


def write_best(path: Path, t: optuna.trial.FrozenTrial, space: Space, study_name: str, url: str, ctx: dict) -> list[str]:
    overrides = best_overrides(t, space, ctx)
    values = {m: float(v) for m, v in zip(space.metrics, t.values)}
    doc = {"space": space.name, "study": study_name, "storage": redact(url), "trial": t.number, "values": values,
           "params": {k: float(v) if isinstance(v, (int, float)) else v for k, v in t.params.items()},
           "overrides": overrides}
    head = (f"# Best trial of study '{study_name}' (search={space.name}): trial {t.number}, "
            + ", ".join(f"{k}={v:.4f}" for k, v in values.items()) + "\n"
            f"# Apply: {space.applies_to}\n"
            "# (flags and key=value overrides given on the command line win over these)\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(head + yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return overrides


def read_best(path: str | os.PathLike) -> list[str]:
    """The overrides of a ``best.yaml`` written by ``augment search`` (for ``--from-search``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / BEST_FILE
    if not p.is_file():
        raise UserError(f"--from-search {path}: no such file: pass the best.yaml of an `augment search` run")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"--from-search {p} is not valid YAML ({str(exc).splitlines()[0]}): pass a best.yaml "
                        "written by `augment search`") from None
    overrides = doc.get("overrides") if isinstance(doc, dict) else None
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise UserError(f"--from-search {p} has no 'overrides' list of key=value strings: pass a best.yaml "
                        "written by `augment search`")
    return overrides


def plot_all(study: optuna.Study, space: Space, out: Path) -> dict[str, str]:
    """History, parameter importances and (several objectives) the Pareto front as PNGs; a note
    instead of a file where a plot cannot be made yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    plots: dict[str, str] = {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    def save(key: str, filename: str, draw: Callable[[], Any]) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
            fig.set_size_inches(7, 4.5)
            fig.tight_layout()
            fig.savefig(out / filename, dpi=110)
            plt.close(fig)
            plots[key] = filename
        except Exception as exc:  # noqa: BLE001 - a plot must never lose the search's results
            plt.close("all")
            plots[key] = f"skipped: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"

    if not complete:
        return {"history": "skipped: no complete trial yet", "importances": "skipped: no complete trial yet"}
    for i, metric in enumerate(space.metrics):
        suffix = f"_{metric}" if space.multi else ""
        target = (lambda t, i=i: t.values[i]) if space.multi else None
        save(f"history{suffix}", f"history{suffix}.png",
             lambda target=target, metric=metric: ovm.plot_optimization_history(study, target=target, target_name=metric))
        if len(complete) < 2:
            plots[f"importances{suffix}"] = f"skipped: {len(complete)} complete trial(s), importances need at least 2"
        else:
            save(f"importances{suffix}", f"importances{suffix}.png",
                 lambda target=target, metric=metric: ovm.plot_param_importances(study, target=target, target_name=metric))
    if space.multi:
        save("pareto", "pareto.png", lambda: ovm.plot_pareto_front(study, target_names=list(space.metrics)))
    return plots


def summarize(study: optuna.Study, space: Space, out: Path, url: str, ctx: dict, run: dict) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    this_run = [t for t in trials if t.user_attrs.get("session") == run["session"]]
    best = best_trial(study, space)
    metrics: dict[str, Any] = {
        "space": space.name, "study": study.study_name, "storage": redact(url), "objectives": dict(zip(space.metrics, space.directions)),
        "n_trials": {s.name: states.get(s.name, 0) for s in TrialState}, "total_trials": len(trials),
        "this_run": {"trials": len(this_run), "states": dict(Counter(t.state.name for t in this_run)),
                     "seconds": run["seconds"], "workers": run["workers"], "runtime": run["runtime"],
                     "interrupted": run["interrupted"], "stored_before": run["stored_before"],
                     "worker_pids": sorted({t.user_attrs.get("worker_pid") for t in this_run if t.user_attrs.get("worker_pid")})},
        "classes": ctx["classes"], "best": None,
    }
    if best is not None:
        overrides = write_best(out / BEST_FILE, best, space, study.study_name, url, ctx)
        metrics["best"] = {**_trial_record(best, space), "overrides": overrides, "file": str(out / BEST_FILE)}
    if space.multi:
        metrics["pareto_front"] = [_trial_record(t, space) for t in (study.best_trials if best is not None else [])]
    enqueued = [t for t in trials if t.user_attrs.get("enqueued") and t.state == TrialState.COMPLETE]
    if enqueued:
        metrics["default_trial"] = _trial_record(enqueued[0], space)
    if "baseline" in ctx:
        metrics["baseline"] = {k: v for k, v in ctx["baseline"].items() if k != "checkpoint"}
    for key in ("data_fingerprint", "pool", "pool_sha256", "pool_threshold", "models", "extractor", "extractor_sha256",
                "fid_images", "family"):
        if key in ctx:
            metrics.setdefault("context", {})[key] = ctx[key]
    metrics["failures"] = [{"trial": t.number, "error": t.user_attrs.get("error", "no error recorded")}
                           for t in trials if t.state == TrialState.FAIL]
    metrics["plots"] = plot_all(study, space, out)
    try:
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        metrics["trials_csv"] = "trials.csv"
    except Exception as exc:  # noqa: BLE001 - an empty study has no frame
        log.debug("trials.csv: %s", exc)
    metrics["versions"] = versions()
    _print_summary(metrics, space, trials, best)
    return metrics


def _print_summary(metrics: dict, space: Space, trials: list, best: Any) -> None:
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE]
    sign = 1 if space.directions[0] == "maximize" else -1
    top = sorted(done, key=lambda t: -sign * t.values[0])[:5]
    if top:
        names = list(top[0].params)
        rows = [[t.number, *[f"{v:.4f}" for v in t.values], *[f"{t.params.get(n, float('nan')):.4g}" for n in names]] for t in top]
        print(markdown_table(rows, ["trial", *space.metrics, *names]))
    counts = ", ".join(f"{k.lower()} {v}" for k, v in metrics["n_trials"].items() if v)
    print(f"search: {metrics['total_trials']} trial(s) in the study ({counts}); this run {metrics['this_run']['trials']}")
    if best is None:
        first = metrics["failures"][0]["error"] if metrics["failures"] else "none finished"
        print(f"search: no trial completed yet (first failure: {first}); no best.yaml written")
    else:
        print(f"search: best trial {best.number}: " + ", ".join(f"{m}={v:.4f}" for m, v in zip(space.metrics, best.values))
              + f" -> {metrics['best']['file']}")
    if "baseline" in metrics and metrics["baseline"].get("val_mean_auc") is not None:
        print(f"search: real-only baseline val mean AUC {metrics['baseline']['val_mean_auc']:.4f}")
