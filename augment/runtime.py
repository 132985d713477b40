"""Ray runtime: the only module that imports ray.

Work units are plain functions ``fn(payload: dict) -> dict`` named by import path
(``"augment.stages.train:train_one"``) and given a resolved, plain-dict payload: ``${...}``
interpolations do not resolve inside a worker, so configs are resolved on the driver. A
:class:`Worker` is a plain class (tested without Ray); Ray wraps it as an actor with one GPU when
CUDA is present (fractional by ``runtime.gpus_per_worker``), none otherwise.

``runtime=local`` starts Ray on this machine, ``runtime=cluster`` connects to an existing cluster
(``runtime.address=auto`` or ``ray://host:10001``), ``runtime=inline`` runs everything in this
process without Ray. ``ray.init`` happens only inside a command, never on import.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
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
    """Start or connect to Ray for ``runtime=local|cluster`` (no-op for inline or when running)."""
    if is_inline(runtime):
        return
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "logging_level": logging.WARNING}
    if runtime["name"] == "cluster":
        if not runtime["address"]:
            raise UserError("runtime=cluster needs runtime.address: auto (on a cluster node) or ray://host:10001")
        kwargs["address"] = runtime["address"]
    else:
        kwargs["num_cpus"] = _num_cpus(runtime)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot start or reach Ray ({first}): check runtime.address, or use runtime=inline") from None


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
