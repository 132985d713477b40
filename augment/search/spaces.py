"""The search spaces: what each ``search=<space>`` suggests, starts from, prepares and scores.

Every space lives in :data:`SPACES`: a ``suggest`` function that turns an ``optuna.Trial`` into Hydra
override strings, the objective directions, a ``prepare`` step run once on the driver before the
trials (a synthetic pool, a feature extractor) and an ``objective`` that composes the trial's config
with :func:`augment.config.compose` and runs the stage functions and work units on it. The ranges come
from ``configs/search/<space>.yaml``.

* ``pseudo_label``: threshold ``t``, synthetic:real ratio ``r``, synthetic loss weight ``xi``. A pool is
  generated once by the CGAN at ``t = threshold.low`` (its ``p_<class>`` columns stored), every trial
  relabels it at its own ``t`` when it is loaded (``classify.threshold``), trains the classifier on real
  + pool and returns the validation mean AUC. Trials are pruned on the per-epoch validation AUC.
* ``ucgan_weights``: UCGAN's alpha, beta, gamma, eta, xi and learning rates. Each trial trains a short
  UCGAN, generates a small pool labelled by its C, trains the classifier on real + pool; two objectives:
  validation mean AUC (maximize) and the pool's domain FID against real training images (minimize),
  NSGA-II, Pareto front reported.
* ``translator_weights``: the translator's loss weights (``lambda_cyc``, ``lambda_id``, ``lambda_sparse``,
  whichever the family has) and the fixed mask threshold, scored by the mean over findings of the mask
  Dice on the validation split: the scoring of ``augment evaluate`` (:func:`augment.jobs.masks.mask_metrics`,
  the same function, on ``split="val"`` instead of the test split).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from omegaconf import DictConfig

from augment.common import write_json
from augment.config import compose, save_config, to_dict
from augment.data.sources import load_table
from augment.data.table import select_labels
from augment.errors import UserError
from augment.jobs.classifier import open_synthetic, train_seed
from augment.jobs.gan import train_model, training_rows
from augment.jobs.masks import mask_metrics, mask_rule
from augment.metrics.fid import DomainExtractor, features, fid_from_features, iter_folder_batches, list_images
from augment.models import classifier_checkpoint, family_checkpoint, find_models, sha256
from augment.stages.generate import generate
from augment.stages.train import train
from classifiers.model import load_classifier

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
    scfg = cfg.search
    if scfg.get("models"):
        ckpt = classifier_checkpoint(find_models(str(scfg.models)))
        if ckpt is None:
            raise UserError(f"search.models={scfg.models} has no classifier for the FID features "
                            "(models/classifier/**/best.pt): train one with `augment train` or leave search.models empty")
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
    """Refuses data whose validation split has no image of the classes with a ground-truth mask."""
    table = load_table(cfg.data, show_progress=False)
    classes = ctx["classes"]
    val = table.indices("val")
    labels = np.nan_to_num(select_labels(table.labels[val], classes)) > 0.5
    known = np.stack([table.lesion_known[c][val] if c in table.lesion_known else np.zeros(len(val), bool)
                      for c in classes], 1)
    if not (labels & known).any():
        raise UserError(f"no validation image of {', '.join(classes)} in data={table.source} has a ground-truth mask: "
                        "translator_weights needs lesion masks (data=phantom, or a folder source with masks)")
    ctx.update(family=str(cfg.choices.translator))


def mask_score(result: dict) -> dict:
    """The translator objective from a :func:`~augment.jobs.masks.mask_metrics` result: the mean over
    findings of each finding's mean Dice (findings without ground-truth lesions are left out), with
    IoU and PoI averaged the same way and the per-finding Dice as attributes."""
    scored = {c: m for c, m in result["per_class"].items() if m.get("dice_mean") is not None}
    if not scored:
        raise ValueError("no validation lesion with a ground-truth mask to score")

    def mean(key: str) -> float | None:
        values = [m[key] for m in scored.values() if m.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {"values": [mean("dice_mean")],
            "attrs": {"val_iou": mean("iou_mean"), "val_poi": mean("poi_mean"),
                      "val_dice_per_finding": {c: float(m["dice_mean"]) for c, m in scored.items()},
                      "n_lesion_images": int(sum(int(m["n_lesion_images"]) for m in scored.values())),
                      "n_images": int(result["n_images"])}}


def objective_translator(trial: optuna.Trial, overrides: list[str], ctx: dict) -> dict:
    """Train the trial's translator, then score its masks on the validation split with the function and
    protocol ``augment evaluate`` reports on the test split (every image of the split that is healthy or
    has one of the classes, translated to No Finding; ``mask.*`` rule; Dice per finding)."""
    folder = trial_dir(ctx, trial)
    cfg = compose(overrides)
    family = str(cfg.choices.translator)
    ckpt_dir = folder / "models" / family
    train_model({"cfg": to_dict(cfg), "kind": "translator", "family": family, "classes": ctx["classes"],
                 "out": str(ckpt_dir)})
    table = _table(to_dict(cfg)["data"])
    result = mask_metrics(table, ctx["classes"], ckpt_dir / "checkpoint.pt", mask_rule(cfg), split="val")
    score = mask_score(result)
    score["attrs"]["family"] = family
    return score


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
    return train_seed({"cfg": cfg, "seed": int(ctx["classify_seed"]), "out": str(folder), "classes": ctx["classes"],
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
        drop_checkpoints(folder)
    write_json(done, result)
    return result


def _cgan_models(cfg: DictConfig, out: Path, base: list[str], classes: list[str]) -> Path:
    """A train run with a cgan sampler and its classifier: ``search.models``, or trained into
    ``<out>/models-run`` once."""
    scfg = cfg.search
    if scfg.get("models"):
        models = find_models(str(scfg.models))
        if not family_checkpoint(models, "cgan").is_file():
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


def drop_checkpoints(folder: Path) -> None:
    for p in folder.rglob("*.pt"):
        p.unlink(missing_ok=True)


def _table(data_cfg: dict) -> Any:
    key = "table:" + json.dumps(data_cfg, sort_keys=True, default=str)
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = load_table(data_cfg, show_progress=False)
    return _CACHE[key]


def _extractor(ckpt: str, digest: str, device: str) -> Any:
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
