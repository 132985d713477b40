"""Stand-in FID Inception weights for the tests and benchmarks/bench_fid.py (the real file cannot be
downloaded here). Not a test module: imported as ``from fid_weights import random_fid_inception_weights``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2, _inception_v3


def random_fid_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a randomly initialised state dict with the FID Inception architecture to ``path``.

    A stand-in for the real weights (which cannot be downloaded here) in tests and benchmarks:
    the same network, layers and preprocessing, so timings and pytorch-fid equivalence checks are
    meaningful, but the FID values are not comparable with published ones. Convolutions are
    He-normal (so activations neither vanish nor explode through the 90-odd layers), batch norms
    the identity. Uses its own ``torch.Generator``; the global RNG is untouched.

    Args:
        path: output file (parent directories are created).
        seed: seed of the generator.

    Returns:
        The path written.
    """
    # The same surgery as pytorch_fid.inception.fid_inception_v3, minus its weight loading; a
    # mismatch would make InceptionExtractor's strict load_state_dict fail, so drift is caught.
    # Built on the meta device: only names and shapes are needed, and module construction there
    # neither allocates nor draws from the global RNG (default initialisers would).
    with torch.device("meta"):
        net = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b = FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = FIDInceptionE_1(1280)
        net.Mixed_7c = FIDInceptionE_2(2048)

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in net.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif name.endswith("running_var") or (name.endswith(".weight") and t.ndim == 1):
            state[name] = torch.ones(t.shape, dtype=t.dtype)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            state[name] = torch.zeros(t.shape, dtype=t.dtype)
        else:  # conv (4-d) and fc (2-d) weights
            fan_in = int(np.prod(t.shape[1:]))
            state[name] = torch.randn(t.shape, generator=g, dtype=t.dtype) * math.sqrt(2.0 / fan_in)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
