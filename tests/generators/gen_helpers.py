"""Tiny helpers for the generator tests: 32 px, widths of a few channels, CPU."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

CLASSES = ["Edema", "Hernia", "No Finding"]


class TinyClassifier(nn.Module):
    """A small real conv net standing in for the timm classifier: B x 1 x H x W -> B x K logits."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 2, 1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


class FakeXrays(Dataset):
    """Random uint8 images with multi-hot labels (some NaN), like a data source's items."""

    def __init__(self, n: int = 10, size: int = 32, classes: list[str] = CLASSES, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
        k = len(classes)
        labels = torch.zeros(n, k)
        for i in range(n):
            # Class 0 is rare (every 5th image); the others alternate; the last column = "No Finding".
            if i % 5 == 0:
                labels[i, 0] = 1
            elif i % 2 == 0:
                labels[i, 1] = 1
            else:
                labels[i, k - 1] = 1
        labels[1, 0] = math.nan  # a source that does not label class 0 for this image
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "labels": self.labels[i], "path": f"img_{i}.png"}


def tiny_batch(b: int = 4, size: int = 32, k: int = len(CLASSES), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, size, size, generator=g) * 2 - 1
    y = torch.zeros(b, k)
    y[torch.arange(b), torch.arange(b) % k] = 1
    return {"x": x, "y": y}
