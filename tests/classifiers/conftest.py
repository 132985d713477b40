"""A tiny separable problem for the classifier tests: 32 px images, a bright square or not."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset


class SquaresDataset(Dataset):
    """Noisy dark 32 px images; class 0 "Square": a bright 8x8 square somewhere; class 1 "Bar":
    a bright vertical bar. Items follow the classifiers contract (uint8 1 x H x W, float labels)."""

    classes = ["Square", "Bar"]

    def __init__(self, n: int, *, seed: int, size: int = 32, nan_frac: float = 0.0, p_square: float = 0.5) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(20, 60, size=(n, size, size), dtype=np.uint8)
        self.labels = np.zeros((n, 2), dtype=np.float32)
        for i in range(n):
            if rng.random() < p_square:
                r, c = rng.integers(0, size - 8, size=2)
                self.images[i, r : r + 8, c : c + 8] = 220
                self.labels[i, 0] = 1
            if rng.random() < 0.5:
                c = rng.integers(0, size - 3)
                self.images[i, :, c : c + 3] = 200
                self.labels[i, 1] = 1
        if nan_frac:
            self.labels[rng.random((n, 2)) < nan_frac] = np.nan
        self.accessed: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        self.accessed.append(int(i))
        return {"image": torch.from_numpy(self.images[i][None].copy()), "labels": torch.from_numpy(self.labels[i].copy())}


@pytest.fixture
def squares() -> Callable[..., SquaresDataset]:
    return SquaresDataset


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on the shared 2-core CI box, 2 OpenMP threads competing with other
    workers run these tiny models 10-30x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
