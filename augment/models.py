"""The model store: finding, loading and describing trained models.

A train run folder holds ``models/<family>/checkpoint.pt`` for each GAN family (written by
:func:`generators.train.fit`) and ``models/classifier/seed<k>/best.pt`` for the pseudo-labeller
(written by :func:`classifiers.model.save_checkpoint`). ``runs/train/latest`` names the newest run.

What a model can do is read from its family class, never from its name: every GAN family declares
``kind`` (``"sampler"`` or ``"translator"``), ``conditional`` (a sampler that takes the class) and
``adds_no_finding`` (its classifier has a ``No Finding`` output the caller appends), the way timm
models carry their ``default_cfg``. :func:`family_class` resolves a checkpoint's ``_target_`` to that
class through the same allow-list as :func:`augment.config.build`.
"""

from __future__ import annotations

import hashlib
import importlib
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from augment.config import ALLOWED_TARGETS, build, check_targets
from augment.data.labels import NO_FINDING
from augment.errors import UserError
from generators.checkpoint import apply_checkpoint, load_checkpoint

LATEST = Path("runs") / "train" / "latest"
CHECKPOINT = "checkpoint.pt"
CLASSIFIER_TARGET = "classifiers.model.create_classifier"


def sha256(path: Path) -> str:
    """Hex sha256 of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def family_class(target: str) -> type:
    """The class a config's ``_target_`` names (allow-listed like :func:`augment.config.build`)."""
    if not isinstance(target, str) or not target:
        raise UserError(f"model config has no _target_ ({target!r}): not an augment model; retrain it")
    check_targets({"_target_": target})
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(f"model target '{target}' does not exist in this version of augment: "
                        "retrain the model or install the version that wrote it") from None


def model_classes(family_cfg: dict, classes: list[str]) -> list[str]:
    """The class list a model is built with: a family whose classifier has a ``No Finding``
    output (UCGAN's C) gets it appended."""
    if family_class(family_cfg["_target_"]).adds_no_finding:
        return [*classes, NO_FINDING]
    return list(classes)


def model_config(family_cfg: dict, classes: list[str]) -> dict:
    """Resolved model config with the call-site arguments filled in (what the checkpoint stores)."""
    mcfg = dict(family_cfg)
    mclasses = model_classes(mcfg, classes)
    mcfg["classes"] = mclasses
    if isinstance(mcfg.get("classifier"), dict):
        mcfg["classifier"] = {**mcfg["classifier"], "num_classes": len(mclasses)}
    return mcfg


#: The few-shot keywords that sat at the top of a family config before they moved under ``fewshot:``.
_FLAT_FEWSHOT = ("diffaug", "diffaug_p", "diffaug_adaptive", "ada_target", "ada_images", "lecam_weight", "lecam_decay")


def upgrade_model_cfg(model_cfg: dict) -> dict:
    """A stored model config in today's shape: checkpoints written before the few-shot keywords moved
    under ``fewshot:`` (one release) keep loading, with the same values."""
    flat = {k: model_cfg[k] for k in _FLAT_FEWSHOT if k in model_cfg}
    if not flat:
        return model_cfg
    rest = {k: v for k, v in model_cfg.items() if k not in flat}
    return {**rest, "fewshot": {**flat, **dict(model_cfg.get("fewshot") or {})}}


@dataclass(frozen=True)
class ModelInfo:
    """What a trained GAN checkpoint is, without building it."""

    family: str          # the folder name / config option (cgan, fixed_point, ...)
    kind: str            # sampler | translator
    conditional: bool    # a sampler that takes the class (CGAN) or not (UCGAN)
    classes: list[str]
    image_size: int
    step: int
    path: Path

    @property
    def findings(self) -> list[str]:
        """The classes without ``No Finding``."""
        return [c for c in self.classes if c != NO_FINDING]


def load_error(path: Path, exc: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` could not read ``path``."""
    text = str(exc)
    if path.is_file() and path.stat().st_size == 0:
        return f"cannot load {path}: the file is empty (0 bytes): copy or train the checkpoint again"
    if "weights only" in text.lower() or "weights_only" in text:
        return (f"cannot load {path}: it holds pickled Python objects, which augment never loads (only weights-only "
                "checkpoints written by augment train / classify are read): point to such a checkpoint")
    first = re.sub(r"\x1b\[[0-9;]*m", "", text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    first = first.split(". ")[0]
    return f"cannot load {path} (corrupt, truncated or not a checkpoint: {first}): copy or train it again"


_LOAD_ERRORS = (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError, TypeError,
                AttributeError, ImportError, IndexError, KeyError, UnicodeDecodeError)


def peek(path: Path) -> dict:
    """A checkpoint's contents memory-mapped (``weights_only``): its metadata without reading the
    weights, for validating a run's models before the workers load them. Any unreadable file (empty,
    truncated, a pickle of Python objects, not a torch file) or a dict without ``model_cfg`` is a
    one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot load {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _LOAD_ERRORS as exc:
        raise UserError(load_error(path, exc)) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_cfg"), dict):
        raise UserError(f"cannot load {path}: not an augment checkpoint (it has no model_cfg)")
    if not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"cannot load {path}: not an augment checkpoint (it has no state_dict of weights)")
    return ckpt


def family_target(group: str, family: str) -> str | None:
    """The ``_target_`` a config option builds (``generator``/``cgan`` -> ``generators.cgan.CGAN``);
    ``None`` when the option does not exist."""
    from augment.config import config_dir

    path = config_dir() / group / f"{family}.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    target = OmegaConf.load(path).get("_target_")
    return None if target is None else str(target)


def classifier_meta(path: Path) -> dict:
    """Validate a classifier checkpoint (of ``augment classify`` / ``augment train``'s labeller) from its
    metadata: readable weights-only, built by the classifier factory, with a class list. Returns the
    checkpoint (memory-mapped)."""
    ckpt = peek(path)
    target = ckpt["model_cfg"].get("_target_")
    if target != CLASSIFIER_TARGET:
        what = ("a " + getattr(family_class(target), "kind", "model")) if target in ALLOWED_TARGETS else repr(target)
        raise UserError(f"{path} is not a classifier checkpoint (it holds {what}): point to a best.pt of "
                        "augment classify or models/classifier/seed<k>/best.pt of augment train")
    classes = ckpt.get("classes")
    if not isinstance(classes, (list, tuple)) or not classes or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} has no class list: not a classifier checkpoint of augment")
    return ckpt


def describe(path: Path, ckpt: dict | None = None, kind: str | None = None, family: str | None = None) -> ModelInfo:
    """Describe a GAN checkpoint from its stored config and its family class.

    ``kind`` (``sampler`` / ``translator``): refuse a checkpoint of the other kind. ``family`` (``cgan``,
    ``fixed_point``, ...): refuse a checkpoint whose model is not the one that family's config builds
    (a UCGAN copied into ``models/cgan/``). Both are one-line :class:`UserError` s.
    """
    path = Path(path)
    ckpt = peek(path) if ckpt is None else ckpt
    target = ckpt["model_cfg"].get("_target_")
    cls = family_class(target)
    if getattr(cls, "kind", None) not in ("sampler", "translator"):
        raise UserError(f"{path} is not a GAN checkpoint (its model is {target}): "
                        "point to a models/<family>/checkpoint.pt of augment train")
    if kind is not None and cls.kind != kind:
        raise UserError(f"{path} holds a {cls.kind} ({str(target).rsplit('.', 1)[-1]}), not a {kind}: "
                        f"point to the {kind}'s checkpoint")
    if family is not None:
        want = family_target("generator" if cls.kind == "sampler" else "translator", family)
        if want is not None and want != target:
            raise UserError(f"{path} holds a {str(target).rsplit('.', 1)[-1]}, not a {family} "
                            f"({want.rsplit('.', 1)[-1]}): train {family} again or choose the family it holds")
    classes = ckpt.get("classes")
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{path} has no class list: not a checkpoint of augment train")
    try:
        image_size, step = int(ckpt.get("image_size") or 0), int(ckpt.get("step") or 0)
    except (TypeError, ValueError):
        raise UserError(f"{path} has a malformed image_size/step: not a checkpoint of augment train") from None
    return ModelInfo(family=path.parent.name, kind=cls.kind, conditional=bool(cls.conditional),
                     classes=list(classes), image_size=image_size, step=step, path=path)


def _read(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot load {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as exc:
        raise UserError(load_error(path, exc)) from None


def load_model(path: Path, kind: str | None = None, family: str | None = None) -> tuple[Any, dict]:
    """Rebuild a model from its checkpoint's own config (weights_only) with EMA weights, eval mode.

    ``kind`` (``sampler`` / ``translator``) and ``family``: refuse a checkpoint of another kind or
    family before building it (:func:`describe`). The stored ``_target_`` must be one of the
    allow-listed families (:func:`augment.config.build`). Every failure is a one-line UserError.
    """
    path = Path(path)
    ckpt = _read(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_cfg"), dict):
        raise UserError(f"cannot load {path}: not an augment checkpoint (it has no model_cfg)")
    if kind is not None or family is not None:
        describe(path, ckpt, kind=kind, family=family)
    try:
        system = build(upgrade_model_cfg(ckpt["model_cfg"]))
        apply_checkpoint(system, ckpt, ema=True)
    except UserError:
        raise
    except Exception as exc:  # a model_cfg or weights that do not fit this version of the family
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot rebuild the model of {path} ({first[:300]}): it was not written by this version "
                        "of augment train; train it again") from None
    system.eval()
    return system, ckpt


def checkpoint_step(path: Path) -> int:
    """The step a GAN checkpoint reached (0 when it is absent or unreadable)."""
    try:
        return int(load_checkpoint(path)["step"]) if path.is_file() else 0
    except (ValueError, KeyError):
        return 0


def find_models(models: str | None) -> Path:
    """The train run to use: ``--models DIR`` or ``runs/train/latest``."""
    if models:
        path = Path(models).expanduser()
        if (path / "models").is_dir():
            return path.resolve()
        if path.name == "models" and path.is_dir():
            return path.parent.resolve()
        raise UserError(f"--models {models} holds no trained models (expected {path}/models/<family>/{CHECKPOINT}): "
                        "run `augment train` first")
    if not LATEST.is_file():
        raise UserError("no trained models found: run `augment train generator=cgan translator=fixed_point` first "
                        "(or pass --models DIR)")
    return Path(LATEST.read_text().strip())


def mark_latest(run: Path) -> None:
    """Point ``runs/train/latest`` at a train run."""
    LATEST.parent.mkdir(parents=True, exist_ok=True)
    LATEST.write_text(str(run.resolve()) + "\n")


def family_checkpoint(models: Path, family: str) -> Path:
    """Where a family's checkpoint lives in a train run (it may not exist)."""
    return models / "models" / family / CHECKPOINT


def trained_families(models: Path) -> list[str]:
    """The GAN families a train run holds."""
    return sorted(p.parent.name for p in (models / "models").glob(f"*/{CHECKPOINT}"))


def translator_checkpoints(models: Path) -> dict[str, Path]:
    """``{family: checkpoint}`` of the translators of a train run."""
    return {ck.parent.name: ck for ck in sorted((models / "models").glob(f"*/{CHECKPOINT}"))
            if describe(ck).kind == "translator"}


def classifier_checkpoint(models: Path) -> Path | None:
    """The run's pseudo-labelling classifier (``models/classifier/**/best.pt``), if it has one."""
    hits = sorted((models / "models" / "classifier").glob("**/best.pt"))
    return hits[0] if hits else None


__all__ = ["LATEST", "ModelInfo", "checkpoint_step", "classifier_checkpoint", "describe", "family_checkpoint",
           "classifier_meta", "family_class", "family_target", "find_models", "load_error", "load_model", "mark_latest", "model_classes", "model_config", "peek", "sha256",
           "trained_families", "translator_checkpoints", "upgrade_model_cfg"]
