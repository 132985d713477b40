"""The CUDA paths of every stage (marked ``gpu``; run by ``benchmarks/gpu.py`` on the device machine).

The stage tests are parametrized over ``cpu`` and ``cuda``: the same body runs here on the CPU, so the
test itself is exercised on every machine, and on CUDA where there is one. Tests that only mean
something on a CUDA machine (``device=cpu`` honoured beside a GPU, Ray actors given GPUs) are skipped
here with the reason.
"""

from __future__ import annotations

import csv

import pytest
import torch

from augment.cli import main
from augment.models import load_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (run benchmarks/gpu.py on a GPU machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
TINY = ["experiment=smoke", "runtime=inline", "progress=false", "data.n=240", "train.max_steps=4",
        "train.ckpt_every=2", "train.sample_every=null", "classify.epochs=1"]


def _device(d: str) -> list[str]:
    return [f"train.device={d}", f"classify.device={d}", f"generate.device={d}", f"evaluate.device={d}", "train.amp=true",
            "classify.amp=true"]


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("device", DEVICES)
def test_train_generate_classify_on_a_device_and_checkpoints_move_between_devices(device, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    assert main(["train", *TINY, *_device(device), "generator=cgan", "translator=fixed_point", "--out", "t"]) == 0
    # a checkpoint written on the device loads on the CPU (map_location) and runs there and back on the device
    cgan, _ = load_model(tmp_path / "t" / "models" / "cgan" / "checkpoint.pt", kind="sampler")
    y = torch.eye(3)
    on_cpu = cgan.sample(3, y, generator=torch.Generator().manual_seed(0))
    assert on_cpu.shape == (3, 1, 32, 32) and on_cpu.device.type == "cpu"
    cgan.to(device)
    there = cgan.sample(3, y.to(device), generator=torch.Generator(device=device).manual_seed(0))
    assert there.device.type == device and bool(torch.isfinite(there).all())
    cgan.to("cpu")
    assert torch.equal(cgan.sample(3, y, generator=torch.Generator().manual_seed(0)), on_cpu)  # and back, unchanged
    fp, _ = load_model(tmp_path / "t" / "models" / "fixed_point" / "checkpoint.pt", kind="translator")
    x = on_cpu.clone()
    back = fp.to(device).translate(x.to(device), torch.zeros(3, 3, device=device))
    assert back.image.device.type == torch.device(device).type and back.image.shape == x.shape
    assert main(["generate", *TINY, *_device(device), "--models", "t", "--n", "6", "--threshold", "0.0001",
                 "--allow-short", "generate.max_factor=200", "--out", "g"]) == 0
    assert len(_rows(tmp_path / "g" / "labels.csv")) >= 1
    assert main(["classify", *TINY, *_device(device), "--synthetic", "g", "--out", "c"]) == 0
    if device == "cuda":
        assert torch.cuda.max_memory_allocated() > 0  # the work ran on the GPU


@pytest.mark.gpu
@needs_cuda
def test_device_cpu_is_honoured_beside_a_gpu(tmp_path, monkeypatch):
    """Every stage told device=cpu leaves the GPU untouched (no allocation at all)."""
    monkeypatch.chdir(tmp_path)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.max_memory_allocated()
    cpu = _device("cpu")
    assert main(["train", *TINY, *cpu, "generator=cgan", "translator=fixed_point", "--out", "t"]) == 0
    assert main(["generate", *TINY, *cpu, "--models", "t", "--n", "6", "--threshold", "0.0001", "--allow-short",
                 "generate.max_factor=200", "--out", "g"]) == 0
    assert main(["classify", *TINY, *cpu, "--synthetic", "g", "--out", "c"]) == 0
    assert main(["evaluate", *TINY, *cpu, "--models", "t", "--synthetic", "g", "--out", "e"]) == 0
    assert torch.cuda.max_memory_allocated() == before


@pytest.mark.gpu
@pytest.mark.ray
@needs_cuda
def test_ray_actors_are_given_a_gpu():
    pytest.importorskip("ray")
    from augment import runtime

    from augment.config import compose

    rt = compose(["runtime=local", "runtime.num_cpus=2"]).runtime
    try:
        devices = runtime.run_all("augment.search.worker:worker_device", [{"classify": {"device": "auto"}}], rt)
    finally:
        runtime.shutdown()
    assert devices == ["cuda"]  # the actor asked for a GPU and CUDA is visible inside it
