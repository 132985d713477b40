"""``runtime=local`` always starts a private Ray instance (issue 15, item 4).

``ray.init()`` without an address attaches to the machine's registered cluster (the address file of
the last ``ray start``, even a dead one's) or to ``RAY_ADDRESS``, and then rejects ``num_cpus``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from augment import runtime

from raycluster import RayCluster, ray_cli
from cfg_helpers import full_cfg

# A tiny cgan + classifier training (phantom 32 px, a few steps) on runtime=local.
TRAIN = ["train", "generator=cgan", "experiment=smoke", "runtime=local", "runtime.num_cpus=2", "data.n=240",
         "train.max_steps=4", "train.ckpt_every=2", "train.sample_every=null", "classify.epochs=1", "progress=false"]


def local_runtime() -> dict:
    return dict(full_cfg("runtime=local")["runtime"])


def test_local_runtime_asks_ray_for_a_new_local_instance(monkeypatch, caplog):
    """The call itself: ``address="local"`` (never None/auto), with the CPUs, even when RAY_ADDRESS is set."""
    ray = pytest.importorskip("ray")
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    rt = local_runtime()
    rt["num_cpus"] = 2
    runtime.init(rt)
    assert len(calls) == 1
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2
    assert "ignores RAY_ADDRESS=127.0.0.1:9" in caplog.text


def _driver_env(tmp: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no Ray settings but the temp root the cluster registered itself in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(tmp), OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


def _train(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "augment.cli", *TRAIN, "--out", str(out)], env=env, cwd=out.parent,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_train_on_runtime_local_beside_a_running_head_and_a_stale_address(tmp_path):
    """`augment train` succeeds while another Ray head runs on the machine (registered as its current
    cluster), and after that head died leaving its address file and RAY_ADDRESS behind."""
    if ray_cli() is None:
        pytest.skip("the ray command is not installed")
    cluster = RayCluster(head_cpus=1)
    try:
        registered = cluster.address_file.read_text().strip()
        assert registered.endswith(f":{cluster.port}")

        first = _train(tmp_path / "beside", _driver_env(cluster.tmp))
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
        assert (tmp_path / "beside" / "models" / "cgan" / "checkpoint.pt").is_file()
        # a second session (the private instance) beside the head's; the head never saw this driver
        assert len(cluster.sessions()) == 2
        assert not list(cluster.logs().glob("python-core-driver-*")), "the command attached to the running head"

        assert cluster.stop() == []
        assert cluster.procs[0].returncode is not None
        # the dead head's address stays registered (ray start may or may not clear it), and RAY_ADDRESS too
        cluster.address_file.parent.mkdir(parents=True, exist_ok=True)
        cluster.address_file.write_text(registered)
        second = _train(tmp_path / "stale", _driver_env(cluster.tmp, RAY_ADDRESS=registered))
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
        assert (tmp_path / "stale" / "models" / "cgan" / "checkpoint.pt").is_file()
    finally:
        cluster.stop()
        cluster.cleanup()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_run_all_with_more_payloads_than_slots_finishes():
    """Five seeds on two CPUs: each finished actor gives its share back, so the waiting ones start (the
    actors used to live until the last result, and the ones that never got a slot waited forever)."""
    pytest.importorskip("ray")
    rt = local_runtime()
    rt.update(num_cpus=1, cpus_per_worker=1.0)  # one slot, three payloads
    try:
        devices = runtime.run_all("augment.search.worker:worker_device",
                                  [{"classify": {"device": "cpu"}} for _ in range(3)], rt)
    finally:
        runtime.shutdown()
    assert devices == ["cpu", "cpu", "cpu"]
