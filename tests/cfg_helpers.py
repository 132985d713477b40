"""Configs for tests, composed from the YAML the way the CLI composes them (defaults live only there)."""

from __future__ import annotations


def data_cfg(name: str = "phantom", **values):
    """The ``data`` node of ``data=<name>`` composed from the YAML (every key with its default),
    with ``values`` set on top: tests build configs the way the CLI does."""
    from omegaconf import OmegaConf, open_dict

    from augment.config import compose

    node = compose([f"data={name}"]).data
    with open_dict(node):  # dict-valued keys (prevalence) take new entries
        return OmegaConf.merge(node, OmegaConf.create(values))


def full_cfg(*overrides: str) -> dict:
    """The whole resolved config of ``overrides`` as a plain dict (what work units receive)."""
    from augment.config import compose, to_dict

    return to_dict(compose(list(overrides)))
