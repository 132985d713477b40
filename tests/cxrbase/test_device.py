import pytest
import torch

from cxrbase import DeviceError, resolve_device


def test_auto_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_without_cuda_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1", torch.device("cuda:0")):
        with pytest.raises(DeviceError, match="use device=auto or cpu"):
            resolve_device(name)
    assert issubclass(DeviceError, ValueError)


def test_unknown_device_is_torchs_error():
    with pytest.raises(RuntimeError):
        resolve_device("not-a-device")
