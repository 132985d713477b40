"""Data: the label vocabulary, sources (phantom, nih, folder, chexpert, medmnist), patient splits,
the preprocessing cache, synthetic datasets and real/synthetic mixing.

``augment.data.SyntheticDataset(root, transform=...)`` reads a folder written by
``augment generate`` as a plain torch Dataset.
"""

from typing import Any

__all__ = ["SyntheticDataset", "load_table", "XrayDataset"]


def __getattr__(name: str) -> Any:  # lazy: importing augment.data.labels stays light
    if name == "SyntheticDataset":
        from augment.data.synthetic import SyntheticDataset

        return SyntheticDataset
    if name == "load_table":
        from augment.data.sources import load_table

        return load_table
    if name == "XrayDataset":
        from augment.data.table import XrayDataset

        return XrayDataset
    raise AttributeError(name)
