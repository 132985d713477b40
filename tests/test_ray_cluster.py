"""``runtime=cluster`` against a real Ray cluster (issue 19, item 3; issue 15, item 5).

The cluster is ``ray start --head`` on 127.0.0.1 plus one worker node process (one CPU each), with
token authentication and a fresh token; the test stops exactly the processes it started. Without a
cluster: an address where nothing listens (or something that is not Ray) fails within seconds with
one line and exit 2, where ``ray.init`` alone waited minutes.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from augment import runtime
from augment.cli import main
from augment.errors import UserError

from cfg_helpers import full_cfg
from raycluster import RayCluster, free_port, ray_cli

# Tiny settings (as tests/search/search_args.py): phantom at 32 px, 240 images, a few steps, one
# CPU per actor so that two actors need both nodes of the two-node cluster.
TINY = ["experiment=smoke", "data.n=240", "train.max_steps=4", "train.ckpt_every=2", "train.sample_every=null",
        "classify.epochs=1", "progress=false", "runtime.cpus_per_worker=1"]


def cluster_runtime(address: str, timeout: float = 5.0) -> dict:
    rt = dict(full_cfg("runtime=cluster")["runtime"])
    rt.update(address=address, connect_timeout_s=timeout)
    return rt


# -- without a cluster: the address checks ------------------------------------------------------------


@pytest.mark.parametrize("address, host_port", [
    ("10.0.0.5:6380", ("10.0.0.5", 6380)),
    ("head.example", ("head.example", 6379)),
    ("ray://head.example", ("head.example", 10001)),
    ("ray://10.0.0.5:10002", ("10.0.0.5", 10002)),
    ("[fd00::2]:6379", ("fd00::2", 6379)),
])
def test_host_port_of_an_address(address, host_port):
    assert runtime._host_port(address) == host_port


def test_auto_resolves_ray_address_then_the_registered_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert runtime.bootstrap_address("auto")[1] is None  # nothing registered: Ray looks for itself
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.1.2.3:6379\n")
    source, target = runtime.bootstrap_address("auto")
    assert target == "10.1.2.3:6379" and "ray_current_cluster" in source
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:7000")
    assert runtime.bootstrap_address("auto") == ("RAY_ADDRESS=10.9.9.9:7000", "10.9.9.9:7000")


@pytest.mark.timeout(60)
def test_cluster_address_where_nothing_listens_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """ray.init waited more than 5 minutes here; the probe refuses at once and leaves no --out behind."""
    monkeypatch.chdir(tmp_path)
    port = free_port()  # bound and released: nothing listens
    out = tmp_path / "run"
    code = main(["train", "generator=cgan", *TINY, "runtime=cluster", f"runtime.address=127.0.0.1:{port}",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("augment: error: "), err
    assert f"nothing answers at 127.0.0.1:{port}" in err[0] and "ray start --head" in err[0]
    assert not out.exists()


@pytest.mark.timeout(60)
def test_a_stale_registered_address_fails_fast_with_its_source(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    port = free_port()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    with pytest.raises(UserError, match=r"runtime.address=auto \(127.0.0.1:\d+ from .*ray_current_cluster\): "
                                        r"nothing answers"):
        runtime.init(cluster_runtime("auto"))


@pytest.mark.timeout(60)
def test_a_port_that_never_answers_fails_at_the_connect_timeout():
    with socket.socket() as server:  # accepts (the kernel does), never speaks
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(UserError, match=r"no answer from 127.0.0.1:\d+ within 1 s \(runtime.connect_timeout_s\)"):
            runtime.init(cluster_runtime(address, timeout=1))


@pytest.mark.timeout(60)
def test_a_port_that_is_not_ray_says_so():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(UserError, match="is not a Ray cluster port"):
            runtime.init(cluster_runtime(f"127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
        server.server_close()


def test_connect_timeout_must_be_positive():
    with pytest.raises(UserError, match="connect_timeout_s"):
        runtime.init(cluster_runtime("127.0.0.1:1", timeout=0))


# -- a real cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    if ray_cli() is None:
        pytest.skip("the ray command is not installed")
    c = RayCluster(head_cpus=1)
    try:
        c.add_worker(cpus=1)  # a second node: two one-CPU actors need both
        yield c
    finally:
        left = c.stop()
        c.cleanup()
    assert left == [], f"processes of the test cluster outlived it: {left}"


def augment(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "augment.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def drivers(cluster: RayCluster) -> set[int]:
    """Pids of the drivers that connected to the cluster (each leaves a core-driver log there)."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in cluster.logs().glob("python-core-driver-*_*.log")}


def workers(cluster: RayCluster) -> set[int]:
    """Pids of the worker processes the cluster's raylets started."""
    return {int(p.stem.rsplit("_", 1)[1]) for p in cluster.logs().glob("python-core-worker-*_*.log")}


def _popen_pid(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 400) -> tuple[int, int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "augment.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.pid, proc.returncode, out


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_train_and_a_two_worker_search_run_on_the_cluster(cluster, tmp_path):
    env = cluster.env()
    target = ["runtime=cluster", f"runtime.address={cluster.address}"]
    pid, code, out = _popen_pid(["train", "generator=cgan", *TINY, *target, "--out", str(tmp_path / "train")],
                                env, tmp_path)
    assert code == 0, out[-4000:]
    assert (tmp_path / "train" / "models" / "cgan" / "checkpoint.pt").is_file()
    assert pid in drivers(cluster), "the train command did not connect to the test cluster"
    assert len(cluster.sessions()) == 1, "a private Ray instance was started instead"

    before = workers(cluster)
    pid, code, out = _popen_pid(["search", "search=pseudo_label", *TINY, *target, "search.pool_n=24",
                                 "search.params.threshold.low=0.1", "search.baseline=false",
                                 f"search.models={tmp_path / 'train'}", "--trials", "2", "--workers", "2",
                                 "--out", str(tmp_path / "search")], env, tmp_path)
    assert code == 0, out[-4000:]
    metrics = json.loads((tmp_path / "search" / "metrics.json").read_text())
    assert metrics["n_trials"]["COMPLETE"] == 2
    assert metrics["this_run"]["trials"] == 2
    trial_pids = set(metrics["this_run"]["worker_pids"])
    assert len(trial_pids) == 2, metrics["this_run"]  # one trial on each node's actor
    assert pid in drivers(cluster)
    assert trial_pids <= workers(cluster) - before, "the trials did not run in the test cluster's workers"
    assert len(cluster.sessions()) == 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_refused_token_says_authentication_and_how_to_pass_it(cluster, tmp_path):
    args = ["train", "generator=cgan", *TINY, "runtime=cluster", f"runtime.address={cluster.address}",
            "--out", str(tmp_path / "run")]
    wrong = augment(args, cluster.env(RAY_AUTH_TOKEN="not-the-token"), tmp_path)
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    last = wrong.stderr.strip().splitlines()[-1]
    assert last.startswith("augment: error: ") and "authentication failed" in last
    assert "RAY_AUTH_MODE=token, and the token sent was missing or wrong" in last and "RAY_AUTH_TOKEN" in last
    assert "not-the-token" not in wrong.stderr

    env = cluster.env()
    del env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]
    env["HOME"] = str(tmp_path)  # no default token file (~/.ray/auth_token) either
    unset = augment(args, env, tmp_path)
    assert unset.returncode == 2, unset.stderr[-3000:]
    last = unset.stderr.strip().splitlines()[-1]
    assert "authentication failed" in last and "RAY_AUTH_MODE is not set here" in last
    assert not (tmp_path / "run").exists()
