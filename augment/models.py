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
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from augment.config import build, check_targets
from augment.data.labels import NO_FINDING
from augment.errors import UserError
from generators.checkpoint import apply_checkpoint, load_checkpoint

LATEST = Path("runs") / "train" / "latest"
CHECKPOINT = "checkpoint.pt"


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


def peek(path: Path) -> dict:
    """A checkpoint's contents memory-mapped (``weights_only``): its metadata without reading the
    weights, for validating a run's models before the workers load them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"cannot load {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"cannot load {path} (corrupt, truncated or not a checkpoint): {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model_cfg" not in ckpt:
        raise UserError(f"cannot load {path}: not an augment checkpoint (it has no model_cfg)")
    return ckpt


def describe(path: Path, ckpt: dict | None = None) -> ModelInfo:
    """Describe a GAN checkpoint from its stored config and its family class."""
    ckpt = peek(path) if ckpt is None else ckpt
    cls = family_class(ckpt["model_cfg"].get("_target_"))
    if getattr(cls, "kind", None) not in ("sampler", "translator"):
        raise UserError(f"{path} is not a GAN checkpoint (its model is {ckpt['model_cfg'].get('_target_')}): "
                        "point to a models/<family>/checkpoint.pt of augment train")
    return ModelInfo(family=path.parent.name, kind=cls.kind, conditional=bool(cls.conditional),
                     classes=list(ckpt.get("classes") or []), image_size=int(ckpt.get("image_size") or 0),
                     step=int(ckpt.get("step") or 0), path=path)


def _read(path: Path) -> dict:
    try:
        return load_checkpoint(path)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot load {path}: {exc}") from None


def load_model(path: Path, kind: str | None = None) -> tuple[Any, dict]:
    """Rebuild a model from its checkpoint's own config (weights_only) with EMA weights, eval mode.

    ``kind`` (``sampler`` / ``translator``): refuse a checkpoint of the other kind before building it.
    The stored ``_target_`` must be one of the allow-listed families (:func:`augment.config.build`).
    """
    ckpt = _read(path)
    if not isinstance(ckpt.get("model_cfg"), dict):
        raise UserError(f"cannot load {path}: not an augment checkpoint (it has no model_cfg)")
    if kind is not None:
        info = describe(path, ckpt)
        if info.kind != kind:
            raise UserError(f"{path} holds a {info.kind} ({ckpt['model_cfg']['_target_'].rsplit('.', 1)[-1]}), "
                            f"not a {kind}: point to the {kind}'s checkpoint")
    system = build(ckpt["model_cfg"])
    apply_checkpoint(system, ckpt, ema=True)
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
           "family_class", "find_models", "load_model", "mark_latest", "model_classes", "model_config", "peek", "sha256",
           "trained_families", "translator_checkpoints"]
