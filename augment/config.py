"""Hydra configuration: the config tree, composition, and the only caller of ``instantiate``.

The tree lives at the repository root in ``configs/`` and ships inside the package as
``augment/configs`` (see ``pyproject.toml``), so editable and non-editable installs find it. It is
always loaded by absolute path: a relative ``config_path`` breaks under a console script.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as _hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from augment.errors import UserError

PRIMARY = "augment"
# Exact targets, not prefixes: anything under ``torch.`` would admit torch.hub.load, torch.load or
# torch.utils.cpp_extension.load_inline, i.e. code execution from a config or a checkpoint's model_cfg.
ALLOWED_TARGETS = frozenset({
    "generators.cgan.CGAN",
    "generators.ucgan.UCGAN",
    "generators.translators.fixed_point.FixedPointGAN",
    "generators.translators.taggan.TagGAN",
    "generators.translators.branched.BranchedGAN",
    "classifiers.model.create_classifier",
})


def config_dir() -> Path:
    """Absolute path of the config tree (installed package first, then the source checkout)."""
    try:
        path = Path(str(importlib.resources.files("augment.configs")))
        if (path / f"{PRIMARY}.yaml").is_file():
            return path.resolve()
    except (ModuleNotFoundError, TypeError):
        pass
    path = Path(__file__).resolve().parents[1] / "configs"
    if (path / f"{PRIMARY}.yaml").is_file():
        return path
    raise UserError("the augment config tree was not found; reinstall the package with `pip install .`")


def group_options(group: str) -> list[str]:
    """Names of the options of a config group (``data`` -> ``["chexpert", "folder", ...]``)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _dict_overrides(overrides: Sequence[str]) -> list[str]:
    """``key={a: 1}`` sets the whole dict: Hydra refuses it on a struct node whose YAML value lacks
    ``a`` ("Could not override"), so it is given to Hydra as ``~key`` then ``+key={a: 1}``."""
    out: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and "." in key and not key.startswith(("+", "~")) and value.strip().startswith("{"):
            out += [f"~{key}", f"+{key}={value}"]
        else:
            out.append(item)
    return out


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the primary config with Hydra overrides; bad overrides become one-line UserErrors."""
    overrides = _dict_overrides(overrides)
    for item in overrides:
        key, _, value = item.partition("=")
        group = key.lstrip("+~")
        if group in {"data", "generator", "translator", "classifier", "runtime", "search", "experiment"} and value:
            options = group_options(group)
            if "," not in value and value not in options and value != "null":
                raise UserError(f"unknown {group} '{value}': choose one of {', '.join(options)} ({group}=<name>)")
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="augment"):
            cfg = _hydra_compose(config_name=PRIMARY, overrides=overrides, return_hydra_config=True)
            choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
                       if not str(k).startswith("hydra") and v is not None}
            with open_dict(cfg):
                del cfg["hydra"]
                cfg["choices"] = choices  # which option of each group was composed (e.g. generator: cgan)
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"bad configuration override: {first} (see `augment --help` for the syntax key=value)") from None
    check_targets(cfg)  # a `_target_` given on the command line or in a search's best.yaml is refused here
    return cfg


def to_dict(cfg: DictConfig | dict) -> dict[str, Any]:
    """Resolved plain-dict copy of a config node (safe to send to Ray workers or store in checkpoints)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def check_targets(node: Any) -> None:
    """Refuse any ``_target_`` that is not one of :data:`ALLOWED_TARGETS` (a config can run code)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        target = node.get("_target_")
        if target is not None and str(target) not in ALLOWED_TARGETS:
            raise UserError(
                f"refusing to instantiate '{target}': configs may only build augment's models "
                f"({', '.join(sorted(t.rsplit('.', 1)[-1] for t in ALLOWED_TARGETS))})"
            )
        for value in node.values():
            check_targets(value)
    elif isinstance(node, list):
        for value in node:
            check_targets(value)


def build(node: DictConfig | dict, **kwargs: Any) -> Any:
    """Instantiate a config node; extra keyword arguments are given at the call site.

    The only caller of ``hydra.utils.instantiate`` in the project.
    """
    check_targets(node)
    if isinstance(node, dict):
        node = OmegaConf.create(node)
    return instantiate(node, _convert_="all", **kwargs)


#: ``scheme://user:password@host``: the password part of a URL (a PostgreSQL study storage, a Ray client).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]+)(?P<tail>@)")
#: Keys whose values are secrets wherever they appear (a Ray cluster token, a database password).
_SECRET_KEYS = ("password", "token", "secret")
MASK = "***"


def redact_text(text: str) -> str:
    """``text`` with every URL password replaced by ``***``."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", text)


def redacted(node: Any) -> Any:
    """A copy of a (resolved, plain) config with secrets masked: URL passwords anywhere, and the values
    of keys named like password/token/secret. Saved files (config.yaml, dataset.json, metrics.json)
    hold this copy; the workers get the real one."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: (MASK if any(s in str(k).lower() for s in _SECRET_KEYS) and v not in (None, "")
                    else redacted(v)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [redacted(v) for v in node]
    if isinstance(node, str):
        return redact_text(node)
    return node


def save_config(cfg: DictConfig | dict, path: Path) -> None:
    """Write the resolved config as YAML, secrets masked (:func:`redacted`)."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(redacted(cfg)), resolve=True))
