"""Device choice, in one place: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ..."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device was asked for that this machine does not have."""


def resolve_device(name: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device(name)``.

    Raises:
        DeviceError: a CUDA device was asked for and CUDA is not available.
    """
    if isinstance(name, torch.device):
        if name.type == "cuda" and not torch.cuda.is_available():
            raise DeviceError(f"device={name} but CUDA is not available: use device=auto or cpu")
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device={name} but CUDA is not available: use device=auto or cpu")
    return torch.device(name)


__all__ = ["DeviceError", "resolve_device"]
