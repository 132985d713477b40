import pytest

from stage_args import GEN, TINY, TRAIN


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary working directory (runs/ and runs/train/latest land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path




@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """One tiny train run (cgan + fixed_point + the labeller classifier) shared by the stage tests."""
    from augment.cli import main

    root = tmp_path_factory.mktemp("models")
    assert main(["train", *TRAIN, "--out", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="session")
def synthetic(models, tmp_path_factory):
    from augment.cli import main

    out = tmp_path_factory.mktemp("syn") / "set"
    assert main(["generate", *GEN, "--n", "20", "--models", str(models), "--out", str(out)]) == 0
    return out
