"""A throwaway Ray cluster for tests: ``ray start --head`` (and worker nodes) on this machine.

Each node is one ``ray start --block`` process whose children are the node's daemons (GCS, raylet,
agents). :meth:`RayCluster.stop` ends exactly the processes this object started: the ``--block``
process (which stops its children on SIGTERM), then any of the children it recorded that are still
alive, by their ids. ``RAY_TMPDIR`` points at a private, short folder (Unix socket paths are limited
to ~107 bytes), so the cluster registers its address there, not in the machine's ``/tmp/ray``: tests
see a "registered cluster on this machine" without touching other users' Ray.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def ray_cli() -> str | None:
    exe = BIN / "ray"
    return str(exe) if exe.is_file() else shutil.which("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc), deepest last."""
    by_parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie: with the
    pid it names one process, never a later one that reuses the id."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(proc: tuple[int, int]) -> bool:
    return start_time(proc[0]) == proc[1]


class RayCluster:
    """``ray start --head`` on 127.0.0.1 with token authentication and a fresh token, plus worker nodes."""

    def __init__(self, head_cpus: int = 1) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(16)
        self.procs: list[subprocess.Popen] = []
        self.descendants: set[tuple[int, int]] = set()  # (pid, start time)
        self._start(["--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--include-dashboard=false"], "head")
        self.wait_nodes(1)

    # The environment of the nodes and of a driver that may connect (RAY_AUTH_TOKEN is the token).
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_TMPDIR=str(self.tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")
        env.update(extra)
        return env

    def _start(self, args: list[str], name: str) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        proc = subprocess.Popen([ray_cli(), "start", *args, "--disable-usage-stats", "--block"], env=self.env(),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)

    def add_worker(self, cpus: int = 1) -> None:
        self._start([f"--address={self.address}", f"--num-cpus={cpus}"], f"worker{len(self.procs)}")
        self.wait_nodes(len(self.procs))

    @property
    def address_file(self) -> Path:
        return self.tmp / "ray" / "ray_current_cluster"

    def logs(self) -> Path:
        """The cluster's session log folder (every node on this machine writes there)."""
        sessions = sorted((self.tmp / "ray").glob("session_2*"))
        return sessions[0] / "logs"

    def sessions(self) -> list[Path]:
        return sorted((self.tmp / "ray").glob("session_2*"))

    def wait_nodes(self, n: int, timeout: float = 120.0) -> None:
        """Wait until ``n`` raylets run (each node's log says so) and the GCS answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}: see {self.tmp}/*.log")
            started = sum(1 for p in self.tmp.glob("*.log") if b"Ray runtime started" in p.read_bytes())
            if started >= n and self.address_file.is_file():
                self._record()
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not start within {timeout:g} s: see {self.tmp}/*.log")

    def _record(self) -> None:
        for proc in self.procs:
            for pid in children(proc.pid):
                started = start_time(pid)
                if started is not None:
                    self.descendants.add((pid, started))

    def stop(self) -> list[tuple[int, int]]:
        """Stop the nodes (workers first); returns the recorded processes that had to be killed."""
        self._record()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in self.descendants):
            time.sleep(0.2)
        left = [p for p in self.descendants if alive(p)]
        for pid, _ in left:  # only processes this cluster started (recorded as its descendants)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return left

    def cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
