"""The one training loop for every GAN family (samplers and translators): ``fit``.

Data: dataset items follow the ``cxrbase`` item contract (``"image"`` uint8 1 x H x W, ``"labels"``
float C; 1, 0 or NaN).  Each batch reaches ``system.training_step`` as ``{"x": B x 1 x H x W float in
[-1, 1], "y": B x C float with NaN -> 0}`` on the training device.

A system with ``real_batches_per_step = k`` (CGAN with ``k = n_critic``) receives ``k * batch_size``
images per step, ``k`` fresh real batches for its ``k`` critic updates.

Determinism: batch ``s`` is a pure function of ``(seed, s)``: the index stream is the concatenation of
per-epoch orders, epoch ``e`` being a permutation (or, with ``balanced``, a weighted draw with
replacement) from a ``torch.Generator`` seeded with ``(seed, e)``.  The ``torch.Generator`` handed to
``training_step`` is seeded with ``(seed, s)``.  With checkpoints holding weights, optimiser states, EMA
and the step, a run resumed from step ``k`` performs exactly the updates the uninterrupted run would
(bit-identical on CPU; on GPU up to non-deterministic kernels).

The loop owns devices, AMP (bf16 autocast, CUDA only), resuming and the step; everything around a
step is a hook, in the manner of detectron2's ``engine/train_loop.py`` ``HookBase``: EMA of
``system.G``, metrics (window means, JSON lines, ``on_metrics``), the progress bar, periodic sample
grids (PNG) and checkpoints.  The systems only compute.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cxrbase import balanced_weights, bar, collate, dataset_labels, resolve_device, to_uint8, to_x, versions, write_png
from generators.checkpoint import check_plain, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_STREAM_DATA, _STREAM_STEP, _STREAM_GRID, _STREAM_LOADER = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# Seeds.


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed that depends on ``seed`` and ``keys`` (e.g. a stream id and a step), via numpy's
    SeedSequence, so nearby steps get unrelated streams."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) & 0xFFFFFFFFFFFFFFFF for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def system_class(system: nn.Module) -> str:
    """``module.QualName`` of a system, recorded in checkpoints to refuse resuming another family."""
    return f"{type(system).__module__}.{type(system).__qualname__}"


# ----------------------------------------------------------------------------------------------------
# Data.


class StepBatchSampler:
    """Index batches for steps ``[start_step, stop_step)``; batch ``s`` depends only on ``(seed, s)``.

    Positions ``s*B .. s*B + B - 1`` of an endless index stream; epoch ``e`` of the stream (``n`` indices)
    is ``randperm(n)`` or, with ``weights``, ``multinomial(weights, n, replacement=True)``, drawn from a
    generator seeded with ``(seed, e)``.  Works for datasets smaller than a batch.

    Args:
        n: dataset length.
        batch_size: indices per batch.
        seed: run seed.
        start_step: first step to yield (a resumed run's checkpoint step).
        stop_step: one past the last step.
        weights: optional per-sample weights for class-balanced epochs (e.g. ``cxrbase.balanced_weights``).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        stop_step: int,
        weights: Tensor | np.ndarray | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.weights = None if weights is None else torch.as_tensor(weights).double()
        self._cache: tuple[int, Tensor] | None = None

    def epoch_order(self, epoch: int) -> Tensor:
        """The ``n`` indices of epoch ``epoch``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        g = torch.Generator().manual_seed(derive_seed(self.seed, _STREAM_DATA, epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        self._cache = (epoch, order)
        return order

    def batch(self, step: int) -> list[int]:
        """Indices of batch ``step``."""
        out = []
        for p in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self.epoch_order(p // self.n)[p % self.n]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.stop_step):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)


def to_batch(raw: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A collated batch (``cxrbase.collate``) -> ``{"x": images in [-1, 1], "y": labels with NaN -> 0}``
    on ``device``."""
    x = to_x(raw["image"], device)
    y = torch.nan_to_num(raw["labels"].to(device, non_blocking=True).float(), nan=0.0)
    return {"x": x, "y": y}


# ----------------------------------------------------------------------------------------------------
# EMA and sample grids.


def make_ema(module: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``module`` to hold the exponential moving average."""
    ema = copy.deepcopy(module).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used at the ``updates``-th EMA update: ``min(decay, (1 + n) / (10 + n))``.

    The warm-up lets the average follow the generator early in training; with a fixed 0.999 a
    400-step run would still hold 0.999^400 = 67 % of the random initial weights and sample noise.
    """
    return min(float(decay), (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def update_ema(ema: nn.Module, module: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * module`` for parameters *and* floating-point buffers.

    Batch-norm running statistics are averaged with the same decay as the weights, so the EMA
    generator normalises with statistics that belong to averaged weights rather than to the live
    generator's latest ones (copying them made the EMA G in eval mode twice as far from its own batch
    statistics as the live G).  Integer buffers (``num_batches_tracked``) are copied.
    """
    for pe, p in zip(ema.parameters(), module.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - decay)
    for be, b in zip(ema.buffers(), module.buffers()):
        if be.is_floating_point():
            be.lerp_(b.detach().to(be.dtype), 1.0 - decay)
        else:
            be.copy_(b)


def image_grid(x: Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """Tile B x 1 x H x W images in [-1, 1] into one uint8 H' x W' array (``nrow`` per row)."""
    x = x.detach().float().cpu().clamp(-1, 1)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    x = x[:, :1]
    b, _, h, w = x.shape
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = torch.zeros(rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(b):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top : top + h, left : left + w] = x[i, 0]
    return to_uint8(grid[None, None])[0]


@contextmanager
def _generator_swapped(system: nn.Module, ema: nn.Module | None) -> Iterator[None]:
    """Let ``system`` sample with the EMA generator inside the block (eval mode, no grad)."""
    was_training = system.training
    raw = system.G
    system.eval()
    if ema is not None:
        system.G = ema
    try:
        with torch.no_grad():
            yield
    finally:
        system.G = raw
        system.train(was_training)
        if ema is not None:
            ema.eval()


def _sample_grid(system: nn.Module, batch: dict[str, Tensor], ema: nn.Module | None, seed: int) -> Tensor | None:
    """Images for a progress grid: ``system.sample_grid(batch)`` for translators, G samples for samplers."""
    with _generator_swapped(system, ema):
        if hasattr(system, "sample_grid"):
            return system.sample_grid(batch)
        if not hasattr(system, "sample"):
            return None
        g = torch.Generator().manual_seed(derive_seed(seed, _STREAM_GRID))
        if getattr(system, "conditional", False):
            k = min(len(system.classes), 16)
            y = torch.eye(len(system.classes))[:k].repeat_interleave(8, dim=0)
            return system.sample(y.shape[0], y, generator=g)
        return system.sample(64, generator=g)


def _truncate_log(path: Path, keep_until: int) -> None:
    """Drop JSON lines logged after step ``keep_until`` (left by a run that crashed after its checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", math.inf) <= keep_until:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(f"{line}\n" for line in kept))


# ----------------------------------------------------------------------------------------------------
# Arguments, grouped.


@dataclass(frozen=True)
class LoopConfig:
    """What is trained, how: the settings that decide the updates.

    Args:
        batch_size: images per step.
        max_steps: total number of steps of the run (counting a resumed checkpoint's steps).
        seed: run seed; batches and step generators derive from ``(seed, step)``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"`` (CUDA when available).
        amp: bf16 autocast around ``training_step`` on CUDA (ignored on CPU).
        balanced: class-balanced sampling (weights from label frequencies), so rare classes are learned.
            A system with a ``balanced_batches`` attribute other than None overrides it (UCGAN's
            documented choice, see ``generators.ucgan``).
        num_workers: DataLoader worker processes.
        ema_decay: keep an exponential moving average of ``system.G`` with this decay (e.g. 0.999).
    """

    batch_size: int
    max_steps: int
    seed: int = 0
    device: str | torch.device = "cpu"
    amp: bool = True
    balanced: bool = False
    num_workers: int = 0
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1:
            raise ValueError(f"batch_size and max_steps must be >= 1, got {self.batch_size} and {self.max_steps}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where a run keeps its state, and whether it continues from it.

    Args:
        dir: folder for ``checkpoint.pt`` (and, by default, ``metrics.jsonl`` and ``samples/``).
        every: checkpoint every this many steps (and always at the end).
        resume: continue from ``dir/checkpoint.pt`` when it exists.
        meta: stored in the checkpoint and checked on resume: ``model_cfg`` (with ``_target_``),
            ``classes``, ``image_size``, ``data_fingerprint`` (and any other plain values);
            ``classes``/``image_size`` default to the system's attributes.
    """

    dir: str | Path
    every: int = 500
    resume: bool = True
    meta: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"checkpoint every must be >= 1, got {self.every}")


@dataclass(frozen=True)
class LogConfig:
    """What the run reports.

    Args:
        every: log the mean of the metrics over this many steps.
        path: JSON-lines metrics file (default ``<checkpoint dir>/metrics.jsonl``; none without either).
        sample_every: write a sample grid PNG every this many steps into ``samples/`` beside the
            checkpoint (or the metrics file); None or 0: never.
        progress: show a progress bar (only when stderr is a terminal and ``CI`` is unset).
        on_metrics: called as ``on_metrics(step, metrics)`` at every logged step (``step`` counts
            completed steps, so the last call has ``step == max_steps``), before that step's checkpoint.
    """

    every: int = 10
    path: str | Path | None = None
    sample_every: int | None = None
    progress: bool = True
    on_metrics: Callable[[int, dict[str, float]], None] | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"log every must be >= 1, got {self.every}")


# ----------------------------------------------------------------------------------------------------
# The loop's state and its hooks.


@dataclass
class TrainState:
    """What hooks see of the running loop.

    ``step`` counts completed steps: inside ``after_step`` it is the number of the step just done
    plus one (a resumed run starts at its checkpoint's step, ``start``).
    """

    system: nn.Module
    opts: dict[str, torch.optim.Optimizer]
    loop: LoopConfig
    device: torch.device
    amp: bool  # autocast in effect (asked for, and on CUDA)
    meta: dict[str, Any]  # checkpoint metadata (classes, image_size, model_cfg, ...)
    ema: nn.Module | None = None
    start: int = 0
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the last logged means
    outputs: dict[str, float] = field(default_factory=dict)  # the last training_step's floats
    batch: dict[str, Tensor] | None = None  # the last batch
    logged: bool = False  # ``metrics`` were refreshed at this step
    completed: bool = False  # the loop ended without an exception (at ``max_steps``, or early on ``stop``)
    stop: bool = False  # set by a hook in ``after_step``: end the run after this step (e.g. a time budget);
    # it ends as completed, so the final checkpoint is written (``done`` False below max_steps: resumable)


class HookBase:
    """A piece of work around the loop (detectron2 ``HookBase``).  Hooks run in order at each call.

    ``after_train`` runs even when the loop raised (to close files and bars); work that must only
    follow a finished run checks ``state.completed``.  A hook ends a run early by setting
    ``state.stop`` in ``after_step`` (the run then ends as completed, below ``max_steps``).
    """

    def before_train(self, state: TrainState) -> None:
        """Before the first step (after resuming)."""

    def after_step(self, state: TrainState) -> None:
        """After each step; ``state.step`` already counts it."""

    def after_train(self, state: TrainState) -> None:
        """After the last step, or when the loop raised."""


class EMAHook(HookBase):
    """Update ``state.ema`` from ``system.G`` after every step, with the warm-up of ``ema_decay_at``."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def after_step(self, state: TrainState) -> None:
        update_ema(state.ema, state.system.G, ema_decay_at(self.decay, state.step - 1))


class MetricsHook(HookBase):
    """Average the step outputs over ``every`` steps into ``state.metrics``; append them to a JSON-lines
    file and pass them to ``on_metrics``."""

    def __init__(
        self, every: int, path: Path | None, on_metrics: Callable[[int, dict[str, float]], None] | None
    ) -> None:
        self.every, self.path, self.on_metrics = every, path, on_metrics
        self.window: dict[str, list[float]] = {}
        self.t0 = 0.0

    def before_train(self, state: TrainState) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _truncate_log(self.path, state.step)
        self.t0 = time.perf_counter()

    def after_step(self, state: TrainState) -> None:
        for k, v in state.outputs.items():
            self.window.setdefault(k, []).append(float(v))
        state.logged = state.step % self.every == 0 or state.step == state.loop.max_steps
        if not state.logged:
            return
        state.metrics = {k: float(np.mean(v)) for k, v in self.window.items()}
        self.window = {}
        bad = [k for k, v in state.metrics.items() if not math.isfinite(v)]
        if bad:
            log.warning("step %d: non-finite metrics %s", state.step, bad)
        if self.path is not None:
            record = {"step": state.step, **state.metrics, "time_s": time.perf_counter() - self.t0}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(state.step, dict(state.metrics))


class ProgressHook(HookBase):
    """A progress bar over the run's steps, showing the first logged metrics (``cxrbase.bar``)."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc = enabled, desc
        self.bar: Any = None

    def before_train(self, state: TrainState) -> None:
        self.bar = bar(state.loop.max_steps, initial=state.step, desc=self.desc, enabled=self.enabled)

    def after_step(self, state: TrainState) -> None:
        self.bar.update(1)
        if state.logged:
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in list(state.metrics.items())[:4]}, refresh=False)

    def after_train(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


class SampleGridHook(HookBase):
    """Every ``every`` steps (and at the end) write ``folder/step_<step>.png``: G's samples for a
    sampler (EMA weights when kept), ``system.sample_grid(batch)`` for a translator."""

    def __init__(self, every: int, folder: Path) -> None:
        self.every, self.folder = every, folder

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every != 0 and state.step != state.loop.max_steps:
            return
        images = _sample_grid(state.system, state.batch, state.ema, state.loop.seed)
        if images is not None:
            write_png(self.folder / f"step_{state.step:07d}.png", image_grid(images), atomic=True)


class CheckpointHook(HookBase):
    """Write ``checkpoint.pt`` every ``every`` steps and at the end of a finished run.

    The payload: the metadata (``model_cfg``, ``classes``, ``image_size``, ``data_fingerprint``, ...),
    ``system_class``, ``state_dict``, ``ema_state_dict``, ``optimizer_states``, ``step``, ``done``,
    ``metrics``, ``fit`` (the loop settings) and ``versions``.
    """

    def __init__(self, path: Path, every: int) -> None:
        self.path, self.every = path, every

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0 and state.step < state.loop.max_steps:
            self.save(state)

    def after_train(self, state: TrainState) -> None:
        if state.completed:
            self.save(state)

    def save(self, state: TrainState) -> None:
        loop = state.loop
        payload = {
            **state.meta,
            "system_class": system_class(state.system),
            "state_dict": state.system.state_dict(),
            "ema_state_dict": state.ema.state_dict() if state.ema is not None else None,
            "optimizer_states": {name: opt.state_dict() for name, opt in state.opts.items()},
            "step": state.step,
            "done": state.step >= loop.max_steps,
            "metrics": state.metrics,
            "fit": {"seed": loop.seed, "batch_size": loop.batch_size, "max_steps": loop.max_steps,
                    "balanced": effective_balanced(state.system, loop), "ema_decay": loop.ema_decay,
                    "amp": state.amp, "real_batches_per_step": real_batches_per_step(state.system)},
            "versions": versions("augment", "timm"),
        }
        save_checkpoint(self.path, payload)


# ----------------------------------------------------------------------------------------------------
# Resuming.


def _target(cfg: Any) -> str | None:
    return cfg.get("_target_") if isinstance(cfg, Mapping) else None


def _check_resume(ckpt: Mapping[str, Any], meta: Mapping[str, Any], system: nn.Module, path: Path) -> None:
    have, want = _target(ckpt.get("model_cfg")), _target(meta.get("model_cfg"))
    if have and want and have != want:
        raise ValueError(
            f"checkpoint {path} was trained by {have}, but this run builds {want}; "
            "use another ckpt_dir or resume=False"
        )
    have_cls, want_cls = ckpt.get("system_class"), system_class(system)
    if have_cls and have_cls != want_cls:
        raise ValueError(
            f"checkpoint {path} holds a {have_cls}, but this run trains a {want_cls}; "
            "use another ckpt_dir or resume=False"
        )
    have_classes = ckpt.get("classes")
    want_classes = meta.get("classes", getattr(system, "classes", None))
    if have_classes is not None and want_classes is not None and list(have_classes) != list(want_classes):
        raise ValueError(
            f"checkpoint {path} was trained on classes {list(have_classes)}, but this run has "
            f"{list(want_classes)}; use another ckpt_dir or resume=False"
        )
    have_size, want_size = ckpt.get("image_size"), meta.get("image_size", getattr(system, "image_size", None))
    if have_size is not None and want_size is not None and int(have_size) != int(want_size):
        raise ValueError(f"checkpoint {path} is for image_size {have_size}, this run uses {want_size}")
    fp_have, fp_want = ckpt.get("data_fingerprint"), meta.get("data_fingerprint")
    if fp_have is not None and fp_want is not None and fp_have != fp_want:
        log.warning("resuming %s trained on other data (fingerprint %s, now %s)", path, fp_have, fp_want)


def _resume(state: TrainState, path: Path) -> None:
    """Load weights, optimiser states, EMA, step and metrics from ``path`` into ``state``."""
    ckpt = load_checkpoint(path)
    _check_resume(ckpt, state.meta, state.system, path)
    try:
        state.system.load_state_dict(ckpt["state_dict"])
        for name, opt in state.opts.items():
            opt.load_state_dict(ckpt["optimizer_states"][name])
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(f"checkpoint {path} does not fit this model: {err}") from err
    if state.ema is not None:
        if ckpt.get("ema_state_dict") is not None:
            state.ema.load_state_dict(ckpt["ema_state_dict"])
        else:
            state.ema.load_state_dict(state.system.G.state_dict())
    state.start = state.step = int(ckpt["step"])
    state.metrics = dict(ckpt.get("metrics") or {})
    fit_cfg = ckpt.get("fit") or {}
    if fit_cfg and (fit_cfg.get("seed"), fit_cfg.get("batch_size")) != (state.loop.seed, state.loop.batch_size):
        log.warning("resuming %s with another seed/batch size: batches differ from the original run", path)
    log.info("resumed %s at step %d", path, state.step)


def effective_balanced(system: nn.Module, loop: LoopConfig) -> bool:
    """Class-balanced batches: the system's ``balanced_batches`` when it sets one, else ``loop.balanced``."""
    own = getattr(system, "balanced_batches", None)
    return bool(loop.balanced if own is None else own)


def real_batches_per_step(system: nn.Module) -> int:
    """Real batches per step the system asks for (``real_batches_per_step``, default 1)."""
    k = int(getattr(system, "real_batches_per_step", 1))
    if k < 1:
        raise ValueError(f"real_batches_per_step must be >= 1, got {k}")
    return k


def _check_batch(batch: dict[str, Tensor], classes: list[str] | None, image_size: int | None) -> None:
    x, y = batch["x"], batch["y"]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be 1 x H x W uint8, got batch shape {tuple(x.shape)}")
    if image_size is not None and tuple(x.shape[2:]) != (image_size, image_size):
        raise ValueError(
            f"data images are {x.shape[2]} x {x.shape[3]} but the model is built for {image_size} px; "
            "prepare the data at the model's size"
        )
    if classes is not None and y.shape[1] != len(classes):
        raise ValueError(f"data has {y.shape[1]} label columns but the model has {len(classes)} classes {classes}")


# ----------------------------------------------------------------------------------------------------
# The loop.


def fit(
    system: nn.Module,
    dataset: Dataset,
    loop: LoopConfig,
    *,
    checkpoint: CheckpointConfig | None = None,
    logs: LogConfig | None = None,
    hooks: Sequence[HookBase] = (),
) -> dict[str, float]:
    """Train ``system`` for ``loop.max_steps`` steps (in total, counting a resumed checkpoint's steps).

    Args:
        system: a ``GANSystem`` (``G``, ``configure_optimizers``, ``training_step``); an ``nn.Module``.
        dataset: items ``{"image": uint8 1 x H x W, "labels": float C (NaN allowed)}``.
        loop: batch size, steps, seed, device, AMP, balanced sampling, workers, EMA decay.
        checkpoint: where to checkpoint and whether to resume; None: no checkpoints.
        logs: logging interval, JSON-lines file, sample grids, progress bar, ``on_metrics``
            (default ``LogConfig()``).
        hooks: extra hooks, run after the built-in ones (EMA, metrics, progress, sample grid,
            checkpoint) at each call.

    Returns:
        The last logged metrics (means over the last logging window), or the checkpoint's metrics when
        it had already reached ``max_steps``.

    Raises:
        ValueError: on a checkpoint of another family, class list or image size, or on data whose image
            size or number of label columns does not fit the system.
        TypeError: on checkpoint metadata that ``torch.load(weights_only=True)`` could not read back.
    """
    logs = logs if logs is not None else LogConfig()
    dev = resolve_device(loop.device)
    meta: dict[str, Any] = dict(checkpoint.meta or {}) if checkpoint is not None else {}
    meta.setdefault("classes", list(getattr(system, "classes", [])) or None)
    meta.setdefault("image_size", getattr(system, "image_size", None))
    check_plain(meta, "ckpt_meta")  # fail now, not at the first checkpoint after hours of training
    ckpt_path = Path(checkpoint.dir) / CHECKPOINT_NAME if checkpoint is not None else None
    log_file = Path(logs.path) if logs.path is not None else None
    if log_file is None and checkpoint is not None:
        log_file = Path(checkpoint.dir) / "metrics.jsonl"
    out_dir = Path(checkpoint.dir) if checkpoint is not None else log_file.parent if log_file else None

    system.to(dev)
    system.train()
    state = TrainState(
        system=system,
        opts=system.configure_optimizers(),
        loop=loop,
        device=dev,
        amp=loop.amp and dev.type == "cuda",
        meta=meta,
        ema=make_ema(system.G) if loop.ema_decay is not None else None,
    )
    if checkpoint is not None and checkpoint.resume and ckpt_path.exists():
        _resume(state, ckpt_path)
        if state.step >= loop.max_steps:
            return state.metrics

    builtin: list[HookBase] = []
    if state.ema is not None:
        builtin.append(EMAHook(loop.ema_decay))
    builtin += [MetricsHook(logs.every, log_file, logs.on_metrics), ProgressHook(logs.progress, type(system).__name__)]
    if logs.sample_every and out_dir is not None:
        builtin.append(SampleGridHook(logs.sample_every, out_dir / "samples"))
    if ckpt_path is not None:
        builtin.append(CheckpointHook(ckpt_path, checkpoint.every))
    all_hooks = [*builtin, *hooks]

    weights = balanced_weights(dataset_labels(dataset)) if effective_balanced(system, loop) else None
    sampler = StepBatchSampler(
        len(dataset),
        loop.batch_size * real_batches_per_step(system),
        seed=loop.seed,
        start_step=state.step,
        stop_step=loop.max_steps,
        weights=weights,
    )
    # Own generator: the DataLoader draws its worker base seed from it instead of the global RNG.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=loop.num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed(loop.seed, _STREAM_LOADER)),
    )
    try:
        for h in all_hooks:
            h.before_train(state)
        for raw in loader:
            batch = to_batch(raw, dev)
            if state.step == state.start:
                _check_batch(batch, meta.get("classes"), meta.get("image_size"))
            gen = torch.Generator(device=dev).manual_seed(derive_seed(loop.seed, _STREAM_STEP, state.step))
            ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if state.amp else nullcontext()
            with ctx:
                state.outputs = system.training_step(batch, state.opts, step=state.step, generator=gen)
            state.batch = batch
            state.step += 1
            for h in all_hooks:
                h.after_step(state)
            if state.stop:
                break
        state.completed = True
    finally:
        for h in all_hooks:
            h.after_train(state)
    return state.metrics


__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointConfig",
    "CheckpointHook",
    "EMAHook",
    "HookBase",
    "LogConfig",
    "LoopConfig",
    "MetricsHook",
    "ProgressHook",
    "SampleGridHook",
    "StepBatchSampler",
    "TrainState",
    "derive_seed",
    "effective_balanced",
    "ema_decay_at",
    "fit",
    "image_grid",
    "make_ema",
    "real_batches_per_step",
    "system_class",
    "to_batch",
    "update_ema",
]
