"""The one training loop for every GAN family (samplers and translators): ``fit``.

Data: dataset items are dicts with ``"image"`` (uint8, 1 x H x W) and ``"labels"`` (float C; 1, 0 or NaN).
Each batch reaches ``system.training_step`` as ``{"x": B x 1 x H x W float in [-1, 1], "y": B x C float
with NaN -> 0}`` on the training device.

Determinism: batch ``s`` is a pure function of ``(seed, s)``: the index stream is the concatenation of
per-epoch orders, epoch ``e`` being a permutation (or, with ``balanced``, a weighted draw with
replacement) from a ``torch.Generator`` seeded with ``(seed, e)``.  The ``torch.Generator`` handed to
``training_step`` is seeded with ``(seed, s)``.  With checkpoints holding weights, optimiser states, EMA
and the step, a run resumed from step ``k`` performs exactly the updates the uninterrupted run would
(bit-identical on CPU; on GPU up to non-deterministic kernels).

The loop owns devices, AMP (bf16 autocast, CUDA only), EMA of ``system.G``, checkpoints, metrics
(JSON lines), the progress bar and periodic sample grids (PNG).  The systems only compute.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import logging
import math
import platform
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from generators.checkpoint import check_plain, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
_STREAM_DATA, _STREAM_STEP, _STREAM_GRID, _STREAM_LOADER = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# Seeds, devices, versions.


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed that depends on ``seed`` and ``keys`` (e.g. a stream id and a step), via numpy's
    SeedSequence, so nearby steps get unrelated streams."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) & 0xFFFFFFFFFFFFFFFF for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device``."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def package_versions() -> dict[str, str]:
    """Python, torch and, where installed, the ``augment`` distribution, timm and numpy versions.

    Read with ``importlib.metadata``, so nothing from ``augment`` is imported.
    """
    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses.
    out = {"python": platform.python_version(), "torch": str(torch.__version__)}
    for name in ("augment", "timm", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def system_class(system: nn.Module) -> str:
    """``module.QualName`` of a system, recorded in checkpoints to refuse resuming another family."""
    return f"{type(system).__module__}.{type(system).__qualname__}"


# ----------------------------------------------------------------------------------------------------
# Data.


def dataset_labels(dataset: Dataset) -> Tensor:
    """The N x C label matrix of a dataset (NaN kept).

    Uses a ``labels`` attribute (array-like N x C) when the dataset has one, so images are not decoded;
    otherwise reads every item's ``"labels"``.
    """
    labels = getattr(dataset, "labels", None)
    if labels is not None and not callable(labels):
        t = torch.as_tensor(np.asarray(labels, dtype=np.float32))
        if t.ndim == 2 and t.shape[0] == len(dataset):
            return t
    return torch.stack([torch.as_tensor(dataset[i]["labels"], dtype=torch.float32) for i in range(len(dataset))])


def balanced_weights(labels: Tensor) -> Tensor:
    """Per-sample sampling weights that equalise classes.

    A sample's weight is ``1 / count`` of its rarest positive class (samples with no positive label form
    one more group), so in expectation every class -- rare ones included -- is drawn about equally often.

    Args:
        labels: N x C, 1 / 0 / NaN.

    Returns:
        N positive float64 weights.
    """
    pos = labels == 1
    counts = pos.sum(dim=0).double()
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1), torch.zeros_like(counts))
    w = (pos.double() * inv).amax(dim=1) if labels.shape[1] else torch.zeros(labels.shape[0], dtype=torch.float64)
    none = ~pos.any(dim=1)
    if none.any():
        w[none] = 1.0 / none.sum().double()
    return w


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
        weights: optional per-sample weights for class-balanced epochs.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        stop_step: int,
        weights: Tensor | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.stop_step = start_step, stop_step
        self.weights = None if weights is None else weights.double()
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


def collate(items: list[Mapping[str, Any]]) -> dict[str, Tensor]:
    """Stack the ``"image"`` (uint8) and ``"labels"`` (float32) of dataset items; other keys are dropped."""
    images = torch.stack([torch.as_tensor(it["image"]) for it in items])
    if images.ndim == 3:  # H x W items
        images = images[:, None]
    labels = torch.stack([torch.as_tensor(it["labels"], dtype=torch.float32) for it in items])
    return {"image": images, "labels": labels}


def to_batch(raw: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """uint8 images -> ``x`` in [-1, 1]; labels -> ``y`` with NaN -> 0; both on ``device``."""
    image = raw["image"].to(device, non_blocking=True)
    x = image.float() / 127.5 - 1.0 if image.dtype == torch.uint8 else image.float()
    y = torch.nan_to_num(raw["labels"].to(device, non_blocking=True).float(), nan=0.0)
    return {"x": x, "y": y}


# ----------------------------------------------------------------------------------------------------
# EMA, images, logs.


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
    """``ema = decay * ema + (1 - decay) * module`` for parameters; buffers (BN statistics) are copied."""
    for pe, p in zip(ema.parameters(), module.parameters()):
        pe.lerp_(p.detach().to(pe.dtype), 1.0 - decay)
    for be, b in zip(ema.buffers(), module.buffers()):
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
    return ((grid + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def write_png(path: str | Path, gray: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit grayscale PNG (zlib only; no imaging library needed)."""
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    h, w = gray.shape
    raw = b"".join(b"\x00" + gray[r].tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(path)


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


def _progress(total: int, initial: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar that is silent when disabled or when stderr is not a terminal (None if no tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with timm's dependencies; stay usable without it
        return None
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=(not enabled) or not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


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


# ----------------------------------------------------------------------------------------------------
# Checkpoint compatibility.


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


# ----------------------------------------------------------------------------------------------------
# The loop.


def fit(
    system: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int,
    max_steps: int,
    device: str | torch.device = "cpu",
    seed: int = 0,
    ckpt_dir: str | Path | None = None,
    ckpt_every: int = 500,
    resume: bool = True,
    ema_decay: float | None = None,
    amp: bool = True,
    balanced: bool = False,
    num_workers: int = 0,
    log_path: str | Path | None = None,
    sample_every: int | None = None,
    ckpt_meta: dict | None = None,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    log_every: int = 10,
) -> dict[str, float]:
    """Train ``system`` for ``max_steps`` steps (in total, counting a resumed checkpoint's steps).

    Args:
        system: a ``GANSystem`` (``G``, ``configure_optimizers``, ``training_step``); an ``nn.Module``.
        dataset: items ``{"image": uint8 1 x H x W, "labels": float C (NaN allowed)}``.
        batch_size: images per step.
        max_steps: total number of steps of the run.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... or ``"auto"`` (CUDA when available).
        seed: run seed; batches and step generators derive from ``(seed, step)``.
        ckpt_dir: folder for ``checkpoint.pt``, ``metrics.jsonl`` and ``samples/``; None: no checkpoints.
        ckpt_every: checkpoint every this many steps (and always at the end).
        resume: continue from ``ckpt_dir/checkpoint.pt`` when it exists.
        ema_decay: keep an exponential moving average of ``system.G`` with this decay (e.g. 0.999).
        amp: bf16 autocast around ``training_step`` on CUDA (ignored on CPU).
        balanced: class-balanced sampling (weights from label frequencies), so rare classes are learned.
        num_workers: DataLoader worker processes.
        log_path: JSON-lines metrics file (default ``ckpt_dir/metrics.jsonl``; None without ckpt_dir).
        sample_every: write a sample grid PNG every this many steps (needs ckpt_dir or log_path).
        ckpt_meta: stored in the checkpoint and checked on resume: ``model_cfg`` (with ``_target_``),
            ``classes``, ``image_size``, ``data_fingerprint``; ``classes``/``image_size`` default to
            the system's attributes.
        on_metrics: called as ``on_metrics(step, metrics)`` at every logged step (``step`` counts
            completed steps, so the last call has ``step == max_steps``).
        progress: show a progress bar (only when stderr is a terminal).
        log_every: log the mean of the metrics over this many steps.

    Returns:
        The last logged metrics (means over the last logging window), or the checkpoint's metrics when
        it had already reached ``max_steps``.

    Raises:
        ValueError: on bad arguments, on a checkpoint of another family, class list or image size, or on
            data whose image size or number of label columns does not fit the system.
    """
    if batch_size < 1 or max_steps < 1 or ckpt_every < 1 or log_every < 1:
        raise ValueError("batch_size, max_steps, ckpt_every and log_every must be >= 1")
    if ema_decay is not None and not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    dev = resolve_device(device)
    meta: dict[str, Any] = dict(ckpt_meta or {})
    meta.setdefault("classes", list(getattr(system, "classes", [])) or None)
    meta.setdefault("image_size", getattr(system, "image_size", None))
    check_plain(meta, "ckpt_meta")  # fail now, not at the first checkpoint after hours of training
    ckpt_path = Path(ckpt_dir) / CHECKPOINT_NAME if ckpt_dir is not None else None
    if log_path is None and ckpt_dir is not None:
        log_path = Path(ckpt_dir) / "metrics.jsonl"
    log_file = Path(log_path) if log_path is not None else None
    samples_dir = (Path(ckpt_dir) if ckpt_dir is not None else log_file.parent if log_file else None)
    samples_dir = samples_dir / "samples" if samples_dir is not None else None

    system.to(dev)
    system.train()
    opts = system.configure_optimizers()
    ema = make_ema(system.G) if ema_decay is not None else None

    start, metrics = 0, {}
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(ckpt, meta, system, ckpt_path)
        try:
            system.load_state_dict(ckpt["state_dict"])
            for name, opt in opts.items():
                opt.load_state_dict(ckpt["optimizer_states"][name])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(f"checkpoint {ckpt_path} does not fit this model: {err}") from err
        if ema is not None:
            if ckpt.get("ema_state_dict") is not None:
                ema.load_state_dict(ckpt["ema_state_dict"])
            else:
                ema.load_state_dict(system.G.state_dict())
        start, metrics = int(ckpt["step"]), dict(ckpt.get("metrics") or {})
        fit_cfg = ckpt.get("fit") or {}
        if fit_cfg and (fit_cfg.get("seed"), fit_cfg.get("batch_size")) != (seed, batch_size):
            log.warning("resuming %s with another seed/batch size: batches differ from the original run", ckpt_path)
        log.info("resumed %s at step %d", ckpt_path, start)
        if start >= max_steps:
            return metrics
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        _truncate_log(log_file, start)

    weights = balanced_weights(dataset_labels(dataset)) if balanced else None
    sampler = StepBatchSampler(
        len(dataset), batch_size, seed=seed, start_step=start, stop_step=max_steps, weights=weights
    )
    # Own generator: the DataLoader draws its worker base seed from it instead of the global RNG.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=dev.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed(seed, _STREAM_LOADER)),
    )
    use_amp = amp and dev.type == "cuda"
    classes = meta.get("classes")
    image_size = meta.get("image_size")
    fit_cfg = {"seed": seed, "batch_size": batch_size, "max_steps": max_steps, "balanced": balanced,
               "ema_decay": ema_decay, "amp": use_amp}

    def checkpoint(step: int) -> None:
        if ckpt_path is None:
            return
        payload = {
            **meta,
            "system_class": system_class(system),
            "state_dict": system.state_dict(),
            "ema_state_dict": ema.state_dict() if ema is not None else None,
            "optimizer_states": {name: opt.state_dict() for name, opt in opts.items()},
            "step": step,
            "done": step >= max_steps,
            "metrics": metrics,
            "fit": fit_cfg,
            "versions": package_versions(),
        }
        save_checkpoint(ckpt_path, payload)

    bar = _progress(max_steps, start, progress, type(system).__name__)
    window: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    step = start
    try:
        for raw in loader:
            batch = to_batch(raw, dev)
            if step == start:
                _check_batch(batch, classes, image_size)
            gen = torch.Generator(device=dev).manual_seed(derive_seed(seed, _STREAM_STEP, step))
            ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
            with ctx:
                out = system.training_step(batch, opts, step=step, generator=gen)
            if ema is not None:
                update_ema(ema, system.G, ema_decay_at(ema_decay, step))
            for k, v in out.items():
                window.setdefault(k, []).append(float(v))
            step += 1
            if bar is not None:
                bar.update(1)
            if step % log_every == 0 or step == max_steps:
                metrics = {k: float(np.mean(v)) for k, v in window.items()}
                window = {}
                bad = [k for k, v in metrics.items() if not math.isfinite(v)]
                if bad:
                    log.warning("step %d: non-finite metrics %s", step, bad)
                if log_file is not None:
                    with open(log_file, "a") as f:
                        f.write(json.dumps({"step": step, **metrics, "time_s": time.perf_counter() - t0}) + "\n")
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(metrics.items())[:4]}, refresh=False)
                if on_metrics is not None:
                    on_metrics(step, dict(metrics))
            if sample_every and samples_dir is not None and (step % sample_every == 0 or step == max_steps):
                images = _sample_grid(system, batch, ema, seed)
                if images is not None:
                    write_png(samples_dir / f"step_{step:07d}.png", image_grid(images))
            if step % ckpt_every == 0 and step < max_steps:
                checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
    checkpoint(step)
    return metrics


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
