"""Checkpoint files: atomic writes and ``weights_only`` reads.

A checkpoint is a plain dict of tensors, dicts, lists, tuples, strings, numbers, bools and None, so
``torch.load(weights_only=True)`` can read it without running code.  ``fit`` writes (see
``generators.train``): ``model_cfg``, ``classes``, ``image_size``, ``data_fingerprint`` (from the caller's
``ckpt_meta``), ``system_class``, ``state_dict``, ``ema_state_dict``, ``optimizer_states``, ``step``,
``done``, ``metrics``, ``fit`` (the loop settings) and ``versions``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Exact types: subclasses (e.g. torch.__version__, a TorchVersion str) are refused by weights_only loads.
_SCALARS = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def check_plain(obj: Any, where: str = "payload") -> None:
    """Raise TypeError naming the first value ``torch.load(weights_only=True)`` could not read back.

    Allowed: tensors, exact ``dict``/``OrderedDict`` (str/int keys), ``list``, ``tuple``, ``str``, ``int``,
    ``float``, ``bool``, ``None``, ``torch.Size``/``dtype``/``device``.
    """
    if type(obj) in _SCALARS or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}] is a {type(k).__name__}; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where} is a {type(obj).__name__}, which torch.load(weights_only=True) cannot read; "
        "convert it to dicts/lists/str/numbers/tensors (e.g. OmegaConf.to_container(cfg, resolve=True))"
    )


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    A crash leaves either the previous checkpoint or the new one, never a torn file.

    Args:
        path: destination file; parent folders are created.
        payload: plain data (see the module docstring).

    Returns:
        The path written.

    Raises:
        TypeError: when the payload holds something ``weights_only`` loading would reject.
    """
    path = Path(path)
    check_plain(payload, "payload")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` onto the CPU.

    Args:
        path: checkpoint file.

    Returns:
        The payload dict.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is truncated, corrupt, not a torch file, or holds non-plain objects.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train first, or point to a run that has checkpoint.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {err}") from err
    if not isinstance(payload, dict):
        raise ValueError(f"checkpoint {path} holds a {type(payload).__name__}, expected a dict")
    return payload


def apply_checkpoint(system: nn.Module, checkpoint: Mapping[str, Any], *, ema: bool = True) -> nn.Module:
    """Load a checkpoint's weights into a system built from its ``model_cfg``.

    Args:
        system: the family's system, built with the same config.
        checkpoint: a payload from ``load_checkpoint``.
        ema: when the checkpoint has ``ema_state_dict``, load it into ``system.G`` (the averaged
            generator is the one to sample from).

    Returns:
        ``system``.

    Raises:
        ValueError: when the weights do not fit the system.
    """
    try:
        system.load_state_dict(checkpoint["state_dict"])
        if ema and checkpoint.get("ema_state_dict") is not None:
            system.G.load_state_dict(checkpoint["ema_state_dict"])
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"checkpoint weights do not fit {type(system).__name__}: {err}") from err
    return system
