import pytest

# Even smaller than experiment=smoke: seconds per stage on a 2-core CPU.
TINY = ["experiment=smoke", "runtime=inline", "data.n=240", "train.max_steps=6", "train.ckpt_every=3",
        "train.sample_every=null", "classify.epochs=2", "progress=false"]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary working directory (runs/ and runs/train/latest land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
