"""Classifier construction and checkpoints: timm models, weights only from local files.

Conventions: ``x`` is an image batch, float in [-1, 1], shape B x 1 x H x W (``in_chans`` channels);
``y`` is a multi-hot float target of shape B x C (1 / 0 / NaN). Models return logits B x C.

Nothing here downloads weights: ``timm.create_model`` is always called with ``pretrained=False``
and pre-trained weights come only from a file named by ``pretrained_path``.

A checkpoint is a plain dict loadable with ``torch.load(weights_only=True)``::

    {"model_cfg": {"_target_": "classifiers.model.create_classifier", "model_name": ..., ...},
     "state_dict": {...}, "classes": [...], "image_size": int, "metrics": {...},
     "versions": {...}, "extra": {...}}

so :func:`load_classifier` rebuilds the model from the checkpoint alone.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from cxrbase import versions

log = logging.getLogger(__name__)

TARGET = "classifiers.model.create_classifier"

# Short names used by configs and tests.  ``tiny`` is timm's ``test_resnet`` (0.37 M parameters):
# a 32 px batch of 16 runs forward + backward in a few tens of milliseconds on one CPU core.
MODEL_ALIASES: dict[str, str] = {"tiny": "test_resnet"}

# Common wrappers around the weights in files written by other code (timm, Lightning, DDP, ours).
_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "net")


def resolve_model_name(model_name: str) -> str:
    """Return the timm architecture name for ``model_name`` (aliases such as ``tiny`` resolved).

    Raises:
        ValueError: for a name timm does not know, with the closest timm names.
    """
    name = MODEL_ALIASES.get(model_name, model_name)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown classifier model '{model_name}'{hint}; use a timm architecture name "
            f"(timm.list_models()) or one of {sorted(MODEL_ALIASES)}"
        )
    return name


def create_classifier(
    model_name: str = "resnet50",
    *,
    num_classes: int,
    in_chans: int = 1,
    pretrained_path: str | os.PathLike | None = None,
    drop_rate: float = 0.0,
    init_seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm classifier that maps ``x`` (B x in_chans x H x W) to logits (B x num_classes).

    Args:
        model_name: timm architecture (``resnet50``, ``resnet18``, ...) or an alias from
            :data:`MODEL_ALIASES` (``tiny``).
        num_classes: number of outputs (one logit per class, multi-label).
        in_chans: input channels; 1 for X-rays.
        pretrained_path: local weights file (a state dict or a checkpoint holding one). The
            classifier head is dropped when its shape differs, and a 3-channel stem is adapted
            to ``in_chans`` the way timm does. Weights are never downloaded.
        drop_rate: dropout before the classifier head.
        init_seed: when given, the random initialisation is drawn from this seed inside
            ``torch.random.fork_rng``, so the same seed gives the same weights and the global
            RNG state is left as it was.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ...).

    Raises:
        ValueError: unknown model name, or ``pretrained=True`` (a download) requested.
        FileNotFoundError: ``pretrained_path`` does not exist.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError(
            "pretrained=True would download weights, which augment never does; "
            "set pretrained_path to a local weights file instead"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    name = resolve_model_name(model_name)

    def build() -> nn.Module:
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, **kwargs
        )

    if init_seed is None:
        model = build()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = build()
    if pretrained_path is not None:
        load_pretrained(model, pretrained_path)
    return model


def _head_prefixes(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    head = cfg.get("classifier")
    if head is None:
        return []
    heads = [head] if isinstance(head, str) else list(head)
    return [h + "." for h in heads]


def _first_conv(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    conv = cfg.get("first_conv")
    if conv is None or isinstance(conv, str):
        return conv
    return conv[0] if conv else None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the weights inside a loaded file: a bare state dict or one wrapped in a checkpoint.

    ``module.`` (DataParallel) and ``_orig_mod.`` (torch.compile) prefixes are removed.

    Raises:
        ValueError: when no tensor dict is found.
    """
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("no state dict (a mapping of parameter names to tensors) found")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights from a local file into ``model`` (in place) and return it.

    The classifier head is dropped (with a log line) when its shape differs from the model's;
    the stem convolution is adapted when the file has a different number of input channels
    (e.g. ImageNet RGB weights into a 1-channel model, timm's ``adapt_input_conv``). Any other
    mismatch is an error.

    Raises:
        FileNotFoundError: the file does not exist (weights are never downloaded).
        ValueError: the file holds no usable weights for this architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file not found: {path}. augment never downloads weights; "
            "put a local weights file at that path or set pretrained_path to null to train from scratch"
        )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        state = extract_state_dict(raw)
    except Exception as exc:  # unpickling, zip and format errors all mean the same to the user
        raise ValueError(f"cannot read pretrained weights from {path}: {exc}") from exc

    own = model.state_dict()
    heads = _head_prefixes(model)
    stem = _first_conv(model)
    dropped: list[str] = []
    for key in list(state):
        if key not in own or state[key].shape == own[key].shape:
            continue
        if any(key.startswith(h) for h in heads):
            dropped.append(key)
            del state[key]
        elif (
            stem is not None
            and key == f"{stem}.weight"
            and state[key].ndim == 4
            and state[key].shape[0] == own[key].shape[0]
            and state[key].shape[2:] == own[key].shape[2:]
        ):
            from timm.models import adapt_input_conv

            log.info("adapting %s from %d to %d input channels", key, state[key].shape[1], own[key].shape[1])
            state[key] = adapt_input_conv(own[key].shape[1], state[key].float()).to(own[key].dtype)
        else:
            raise ValueError(
                f"pretrained weights in {path} do not fit this model: {key} has shape "
                f"{tuple(state[key].shape)}, the model expects {tuple(own[key].shape)}"
            )
    if dropped:
        log.info("dropping classifier head %s from %s (number of classes differs)", ", ".join(dropped), path)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in dropped and not any(k.startswith(h) for h in heads)]
    if missing:
        raise ValueError(
            f"pretrained weights in {path} miss {len(missing)} tensors of this model "
            f"(first: {', '.join(missing[:3])}); is it the same architecture?"
        )
    if result.unexpected_keys:
        log.warning("ignoring %d unexpected tensors in %s (first: %s)", len(result.unexpected_keys), path,
                    ", ".join(result.unexpected_keys[:3]))
    log.info("loaded pretrained weights from %s", path)
    return model


def _plain(obj: Any, where: str = "metrics") -> Any:
    """Convert to types that ``torch.load(weights_only=True)`` accepts (numpy -> Python)."""
    if isinstance(obj, np.generic):  # before float: np.float64 subclasses float but does not unpickle
        return obj.item()
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # plain base types: subclasses (TorchVersion, IntEnum) do not unpickle
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, where) for v in obj]
    raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint (use plain numbers, strings, lists, dicts)")


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_cfg: Mapping[str, Any],
    classes: Sequence[str],
    image_size: int,
    metrics: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a classifier checkpoint atomically (temporary file, then ``os.replace``).

    Args:
        path: destination file; parent folders are created.
        model: the model whose weights are saved (wrappers such as torch.compile are removed).
        model_cfg: keyword arguments of :func:`create_classifier` (``model_name``, ``num_classes``,
            ...); an optional ``_target_`` must be ``classifiers.model.create_classifier``.
            ``pretrained_path`` is not stored: the weights are in the checkpoint.
        classes: class names in logit order.
        image_size: input side length in pixels the model was trained at.
        metrics: validation metrics (numpy numbers are converted to Python ones).
        extra: anything else worth keeping (data fingerprint, training settings).

    Returns:
        The checkpoint path.

    Raises:
        ValueError: a foreign ``_target_`` or a class count that differs from ``num_classes``.
    """
    cfg = dict(model_cfg)
    target = cfg.pop("_target_", TARGET)
    if target != TARGET:
        raise ValueError(f"model_cfg _target_ must be {TARGET}, got {target}")
    cfg.pop("pretrained_path", None)
    cfg.setdefault("num_classes", len(classes))
    if int(cfg["num_classes"]) != len(classes):
        raise ValueError(f"model_cfg num_classes={cfg['num_classes']} but {len(classes)} classes were given")
    payload = {
        "model_cfg": {"_target_": TARGET, **_plain(cfg, "model_cfg")},
        "state_dict": {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()},
        "classes": [str(c) for c in classes],
        "image_size": int(image_size),
        "metrics": _plain(dict(metrics)),
        "versions": versions("timm"),
        "extra": _plain(dict(extra or {}), "extra"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_classifier(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a classifier from a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        map_location: device the weights and the model are put on.

    Returns:
        ``(model, meta)``: the model in eval mode, and the checkpoint without its state dict
        (``model_cfg``, ``classes``, ``image_size``, ``metrics``, ``versions``, ``extra``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is corrupt, not a classifier checkpoint, or names another target.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"classifier checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"model_cfg", "state_dict"} <= set(ckpt):
        raise ValueError(f"{path} is not a classifier checkpoint (needs model_cfg and state_dict)")
    cfg = dict(ckpt["model_cfg"])
    target = cfg.pop("_target_", None)
    if target != TARGET:
        raise ValueError(f"{path}: model_cfg _target_ must be {TARGET}, got {target!r}")
    cfg.pop("pretrained_path", None)
    model = create_classifier(**cfg)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not match its model_cfg: {exc}") from exc
    model.to(map_location).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "MODEL_ALIASES",
    "TARGET",
    "count_parameters",
    "create_classifier",
    "extract_state_dict",
    "load_classifier",
    "load_pretrained",
    "resolve_model_name",
    "save_checkpoint",
]
