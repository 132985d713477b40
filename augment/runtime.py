"""Ray runtime: the only module that imports ray.

Work units are plain functions ``fn(payload: dict) -> dict`` named by import path
(``"augment.stages.train:train_one"``) and given a resolved, plain-dict payload: ``${...}``
interpolations do not resolve inside a worker, so configs are resolved on the driver. A
:class:`Worker` is a plain class (tested without Ray); Ray wraps it as an actor with one GPU when
CUDA is present (fractional by ``runtime.gpus_per_worker``), none otherwise.

``runtime=local`` starts a private Ray instance on this machine (never another cluster running here),
``runtime=cluster`` connects to an existing cluster (``runtime.address=auto``, ``host:6379`` or
``ray://host:10001``) within ``runtime.connect_timeout_s``, with one-line errors for an address where
nothing listens and for a refused authentication token; ``runtime=inline`` runs everything in this
process without Ray. ``ray.init`` happens only inside a command, never on import.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from augment.errors import UserError

log = logging.getLogger(__name__)


def resolve(target: str) -> Callable[[dict], Any]:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


class Worker:
    """Runs one work unit; Ray makes it an actor, ``runtime=inline`` calls it directly."""

    def __init__(self, target: str) -> None:
        self.target = target

    def run(self, payload: dict) -> Any:
        return resolve(self.target)(payload)

    def pid(self) -> int:
        return os.getpid()


# Every setting is read as ``runtime[key]``: the defaults live in configs/runtime/*.yaml only, so a
# node that lacks a key fails loudly (KeyError) instead of silently running with a value from here.


def _num_cpus(runtime: Mapping[str, Any]) -> int:
    """``runtime.num_cpus``; null means every CPU of this machine."""
    n = runtime["num_cpus"]
    return int(os.cpu_count() or 1) if n is None else int(n)


def gpus_per_worker(runtime: Mapping[str, Any]) -> float:
    """GPUs each actor asks for: ``runtime.gpus_per_worker`` when CUDA is present, else 0."""
    import torch

    want = float(runtime["gpus_per_worker"])  # read first: a missing key fails on CPU machines too
    return want if torch.cuda.is_available() else 0.0


def is_inline(runtime: Mapping[str, Any]) -> bool:
    return runtime["name"] == "inline"


def resources(runtime: Mapping[str, Any]) -> dict[str, float]:
    """CPUs and GPUs the runtime can give to workers: ``{"CPU": n, "GPU": g}``.

    ``inline`` and ``local``: this machine (``runtime.num_cpus`` or ``os.cpu_count()``, CUDA devices);
    ``cluster``: the connected Ray cluster's totals (connects first).
    """
    import torch

    gpus = float(torch.cuda.device_count()) if torch.cuda.is_available() else 0.0
    if is_inline(runtime) or runtime["name"] != "cluster":
        return {"CPU": float(_num_cpus(runtime)), "GPU": gpus}
    import ray

    init(runtime)
    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def init(runtime: Mapping[str, Any]) -> None:
    """Start or connect to Ray for ``runtime=local|cluster`` (no-op for inline or when running).

    ``local`` always starts a private instance (``address="local"``): never the machine's registered
    cluster, a stale address file of a dead one, or ``RAY_ADDRESS``. ``cluster`` connects to
    ``runtime.address`` within ``runtime.connect_timeout_s`` (:func:`connect`).
    """
    if is_inline(runtime):
        return
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if runtime["name"] == "cluster":
        connect(runtime, kwargs)
        return
    if os.environ.get(RAY_ADDRESS_ENV):
        log.warning("runtime=local starts a private Ray instance and ignores %s=%s (to use that cluster: "
                    "runtime=cluster runtime.address=auto)", RAY_ADDRESS_ENV, os.environ[RAY_ADDRESS_ENV])
    try:
        ray.init(address="local", num_cpus=_num_cpus(runtime), **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot start a local Ray instance ({_first_line(exc)}): check the Ray install and "
                        "free memory in /dev/shm, or use runtime=inline") from None


RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: Ray's token authentication (Ray >= 2.52): the mode, and where a driver finds the cluster's token.
AUTH_HINT = ("set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or a file named by "
             "RAY_AUTH_TOKEN_PATH; default ~/.ray/auth_token); `ray get-auth-token` on the head prints it")
_AUTH_MARKERS = ("InvalidAuthToken", "Unauthenticated", "authentication token", "AuthenticationError")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _chain_text(exc: BaseException) -> str:
    """Type names and messages of ``exc`` and its causes (Ray wraps the GCS error in a ConnectionError)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _address_file() -> Path:
    """Where ``ray start`` registers this machine's cluster (Ray's own rule: RAY_TMPDIR, TMPDIR, /tmp)."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(base or "/tmp") / "ray" / "ray_current_cluster"


def bootstrap_address(address: str) -> tuple[str, str | None]:
    """``(source, address)``: where the address came from (for messages) and the address a driver
    dials for ``runtime.address``.

    ``auto``: ``RAY_ADDRESS``, else this machine's registered cluster (the address file of the last
    ``ray start``, which may be stale); address ``None`` when neither exists (Ray then looks for a
    running instance itself). ``ray://host[:10001]`` and ``host[:6379]`` as given.
    """
    source = f"runtime.address={address}"
    if address == "auto":
        env = os.environ.get(RAY_ADDRESS_ENV, "").strip()
        if env:
            address, source = env, f"{RAY_ADDRESS_ENV}={env}"
        else:
            path = _address_file()
            try:
                address = path.read_text().strip()
            except OSError:
                return source, None
            if not address:
                return source, None
            source = f"runtime.address=auto ({address} from {path})"
    if address in ("auto", "local"):
        return source, None
    return source, address


def _host_port(address: str) -> tuple[str, int]:
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    rest = rest.split("/", 1)[0]
    default = 10001 if scheme == "ray" else 6379
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port = tail.lstrip(":")
    else:
        host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    if not port:
        return host, default
    if not port.isdigit():
        raise UserError(f"runtime.address={address}: '{port}' is not a port number: pass host:port (the head's "
                        "GCS port, 6379 unless `ray start --port` set another) or ray://host:10001")
    return host, int(port)


#: An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray Client
#: server) answers with its own SETTINGS frame (frame type 4) before any authentication.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe(address: str, timeout: float, source: str) -> None:
    """Fail within ``timeout`` seconds, with one line, unless a gRPC server answers at ``address``.

    ``ray.init`` waits minutes for an address where nothing listens and for a port that never answers
    (the wait is in Ray's C++ client, which no Python timeout interrupts), so a plain socket checks
    first that the port accepts a connection and answers the HTTP/2 handshake that every Ray GCS and
    Ray Client server answers (skipped with ``RAY_USE_TLS``, whose handshake is TLS).
    """
    host, port = _host_port(address)
    if not host:
        raise UserError(f"{source}: no host in the address: pass host:port or ray://host:10001")
    fix = "start the cluster (`ray start --head` on the head node), fix runtime.address, or use runtime=local"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            sock.settimeout(timeout)
            sock.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                chunk = sock.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        raise UserError(f"{source}: no answer from {host}:{port} within {timeout:g} s "
                        f"(runtime.connect_timeout_s): {fix}") from None
    except OSError as exc:
        raise UserError(f"{source}: nothing answers at {host}:{port} ({exc.strerror or type(exc).__name__}): "
                        f"{fix}") from None
    if len(head) < 9 or head[3] != 4:
        raise UserError(f"{source}: {host}:{port} is not a Ray cluster port (no gRPC answer): pass the head's GCS "
                        "address host:port (6379 unless `ray start --port` chose another) or ray://host:10001")


#: ``ray.init`` retries the GCS handshake about once a second, 20 times by default (a refused token
#: took 22 s to report): after a successful probe a few tries are enough.
_CONNECT_TRIES = 3


def connect(runtime: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """``ray.init`` against an existing cluster: fails within ``runtime.connect_timeout_s`` with one
    line where nothing (or something other than Ray) listens (:func:`probe`), and says so when the
    cluster refuses this driver's authentication token."""
    import ray

    address = runtime["address"]
    if not address:
        raise UserError("runtime=cluster needs runtime.address: auto (on a cluster node), host:6379 (the "
                        "head's GCS) or ray://host:10001 (Ray Client)", resumable=False)
    address = str(address)
    timeout = float(runtime["connect_timeout_s"])
    if not timeout > 0:
        raise UserError(f"runtime.connect_timeout_s={runtime['connect_timeout_s']}: give a positive number of "
                        "seconds", resumable=False)
    source, target = bootstrap_address(address)
    if target is not None:
        probe(target, timeout, source)
    env_key = "RAY_gcs_server_port_wait_time_s"  # Ray's own knob for those tries; a user's value wins
    env_set = env_key in os.environ
    if not env_set:
        os.environ[env_key] = str(_CONNECT_TRIES)
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, ray's AuthenticationError
        text = _chain_text(exc)
        if any(m.lower() in text.lower() for m in _AUTH_MARKERS):
            mode = os.environ.get("RAY_AUTH_MODE")
            state = ("RAY_AUTH_MODE is not set here, so no token was sent" if not mode
                     else f"RAY_AUTH_MODE={mode}, and the token sent was missing or wrong")
            raise UserError(f"{source}: authentication failed: the Ray cluster has token authentication on "
                            f"and refused this driver ({state}): {AUTH_HINT}") from None
        raise UserError(f"{source}: cannot connect to the Ray cluster ({_first_line(exc)}): check "
                        "runtime.address, or use runtime=local") from None
    finally:
        if not env_set:
            os.environ.pop(env_key, None)


def shutdown() -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return
    if ray.is_initialized():
        ray.shutdown()


def actor_class(runtime: Mapping[str, Any], *, num_gpus: float | None = None) -> Any:
    """``Worker`` as a Ray actor class with the runtime's GPU, CPU and restart settings."""
    import ray

    restarts = int(runtime["max_restarts"])
    return ray.remote(
        num_gpus=gpus_per_worker(runtime) if num_gpus is None else num_gpus,
        num_cpus=float(runtime["cpus_per_worker"]),
        max_restarts=restarts,
        max_task_retries=restarts,
    )(Worker)


def run_all(target: str, payloads: Sequence[dict], runtime: Mapping[str, Any], *,
            on_result: Callable[[int, Any], None] | None = None,
            poll: Callable[[], None] | None = None, poll_s: float = 2.0) -> list[Any]:
    """Run ``target(payload)`` for every payload, in parallel actors (or inline), in order.

    Args:
        target: ``"module:function"`` of the work unit.
        payloads: plain, resolved dicts (one actor each).
        runtime: the ``runtime`` config node.
        on_result: called as results arrive (index, result), e.g. for progress.
        poll: called every ``poll_s`` seconds while actors work (e.g. a driver-side progress
            display that reads the units' own logs); not called inline, where each unit shows
            its own progress bar.

    Returns:
        The results in the order of ``payloads``. A failing unit re-raises its error here after
        the other units finish.
    """
    if is_inline(runtime) or not payloads:
        results = []
        for i, p in enumerate(payloads):
            results.append(Worker(target).run(p))
            if on_result:
                on_result(i, results[-1])
        return results
    import ray

    init(runtime)
    cls = actor_class(runtime)
    actors = [cls.remote(target) for _ in payloads]
    refs = [a.run.remote(p) for a, p in zip(actors, payloads)]
    index = {r: i for i, r in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    errors: list[BaseException] = []
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=poll_s if poll else None)
            if poll:
                poll()
            for ref in done:
                i = index[ref]
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    errors.append(exc.as_instanceof_cause())
                    continue
                except ray.exceptions.RayError as exc:
                    errors.append(exc)
                    continue
                finally:
                    # A finished actor gives its CPU/GPU share back at once, so the actors still waiting for
                    # one start: with more payloads than slots (5 seeds on 2 CPUs) they used to wait forever.
                    ray.kill(actors[i])
                if on_result:
                    on_result(i, results[i])
    finally:
        for a in actors:
            ray.kill(a)
    if errors:
        raise errors[0]
    return results


class Stateful:
    """Holds one object built from ``payload`` (models loaded once) and runs ``obj.run(spec)``."""

    def __init__(self, target: str, payload: dict) -> None:
        self.obj = resolve(target)(payload)

    def run(self, spec: dict) -> Any:
        return self.obj.run(spec)


class StatefulPool:
    """``workers`` long-lived workers built from one payload, mapping specs to results.

    Inline (``runtime=inline`` or one worker) it is one object in this process; otherwise Ray
    actors (one GPU each where there is one) fed through ``ray.util.ActorPool``. ``map`` yields
    results as they complete (unordered).
    """

    def __init__(self, target: str, payload: dict, workers: int, runtime: Mapping[str, Any]) -> None:
        self.inline = is_inline(runtime)
        if self.inline:
            self.local = Stateful(target, payload)
            return
        import ray
        from ray.util import ActorPool

        init(runtime)
        cls = ray.remote(num_gpus=gpus_per_worker(runtime), num_cpus=float(runtime["cpus_per_worker"]),
                         max_restarts=int(runtime["max_restarts"]),
                         max_task_retries=int(runtime["max_restarts"]))(Stateful)
        ref = ray.put(payload)
        self.actors = [cls.remote(target, ref) for _ in range(workers)]
        self.pool = ActorPool(self.actors)

    def map(self, specs: Sequence[dict]):
        if self.inline:
            for spec in specs:
                yield self.local.run(spec)
            return
        import ray

        try:
            yield from self.pool.map_unordered(lambda a, s: a.run.remote(s), list(specs))
        except ray.exceptions.RayTaskError as exc:
            raise exc.as_instanceof_cause() from None

    def close(self) -> None:
        if self.inline:
            return
        import ray

        for a in self.actors:
            ray.kill(a)
