import platform

import numpy as np
import torch

from cxrbase import versions


def test_versions_are_plain_str():
    v = versions("timm", "surely-not-an-installed-distribution")
    assert v["python"] == platform.python_version()
    assert v["torch"] == str(torch.__version__) and v["numpy"] == np.__version__
    assert "timm" in v and "surely-not-an-installed-distribution" not in v
    assert all(type(k) is str and type(val) is str for k, val in v.items())  # TorchVersion is not str
    assert list(versions()) == ["python", "torch", "numpy"]


def test_versions_survive_a_weights_only_load(tmp_path):
    torch.save({"versions": versions("timm")}, tmp_path / "v.pt")
    assert torch.load(tmp_path / "v.pt", weights_only=True)["versions"] == versions("timm")
