"""Fixtures of the search tests: tiny settings and one trained cgan + labeller shared by them."""

import os

import pytest

from search_args import TINY


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """One tiny train run (cgan + its classifier) shared by the pseudo-label tests."""
    from augment.cli import main

    root = tmp_path_factory.mktemp("search-models")
    cwd = os.getcwd()
    os.chdir(root)  # runs/train/latest lands here, not in the checkout
    try:
        assert main(["train", *TINY, "classify.epochs=1", "generator=cgan", "--out", str(root / "run")]) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads spin against each other
    (a tiny backward pass goes from 0.1 s to seconds). Restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def pool(models, tmp_path_factory):
    """A small synthetic pool at t = 0.1 (with its p_<class> columns), reused via search.pool."""
    from augment.cli import main

    out = tmp_path_factory.mktemp("search-pool") / "pool"
    assert main(["generate", "experiment=smoke", "runtime=inline", "data.n=240", "progress=false", "--models", str(models),
                 "--n", "24", "--threshold", "0.1", "--translator", "none", "--classes", "edema,hernia,effusion",
                 "--out", str(out)]) == 0
    return out
