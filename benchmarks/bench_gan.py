"""Sampler training throughput: steps/s of CGAN and UCGAN, direct and through ``generators.train.fit``.

The systems are built the way ``augment train`` builds them: the config is composed by Hydra
(``generator=<family> data.image_size=<px> classifier=<c-model>``, i.e. the default widths of
``configs/generator/*.yaml``), completed by ``augment.models.model_config`` (classes; UCGAN's
classifier C gets the classes plus ``No Finding``) and instantiated by ``augment.config.build``.

Direct: ``system.training_step(batch, opts, step=s, generator=g)`` in a timed loop on one fixed
random batch (B x 1 x H x W in [-1, 1], random multi-hot labels: speed does not depend on the pixel
values), ``--warmup`` untimed steps then ``--steps`` individually timed steps; median reported.

Loop: ``generators.train.fit`` on an in-memory uint8 dataset with the train stage's settings (EMA
0.999, class-balanced batches, no checkpoints, ``log_every=1`` so ``on_metrics`` time-stamps every
step); the median interval between steps after the warm-up is compared with the direct step, which
shows the loop's own overhead (sampler, collate, uint8 -> float, EMA update, metric logging).

Every row carries the 1-minute load average before and after it (``/proc/loadavg``).

Usage::

    python benchmarks/bench_gan.py                       # cgan + ucgan at 64 and 128 px, CPU
    python benchmarks/bench_gan.py --quick               # seconds-long sanity run
    python benchmarks/bench_gan.py --device cuda --amp   # on a GPU (bf16 autocast, as fit does)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.config import build, compose, to_dict  # noqa: E402
from augment.models import model_config  # noqa: E402
from generators.train import LogConfig, LoopConfig, fit  # noqa: E402
from benchmarks._machine import loadavg, machine  # noqa: E402
from augment.common import markdown_table as table  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_system(family: str, size: int, classes: list[str], c_model: str, overrides: list[str]) -> tuple[nn.Module, dict]:
    cfg = compose([f"generator={family}", f"data.image_size={size}", f"classifier={c_model}", *overrides])
    mcfg = model_config(to_dict(cfg.generator), classes)
    torch.manual_seed(0)
    return build(mcfg), mcfg


def widths(mcfg: dict) -> str:
    out = f"z{mcfg['z_dim']} G{mcfg['g_channels']} D{mcfg['d_channels']}"
    if isinstance(mcfg.get("classifier"), dict):
        out += f" C={mcfg['classifier']['model_name']}"
    return out


class RandomImages(Dataset):
    """n random uint8 images 1 x H x W with random multi-hot labels (each row at least one class)."""

    def __init__(self, n: int, size: int, k: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = rng.integers(0, 256, size=(n, 1, size, size), dtype=np.uint8)
        labels = (rng.random((n, k)) > 0.6).astype(np.float32)
        labels[np.arange(n), rng.integers(0, k, n)] = 1.0
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.images[i]), "labels": torch.from_numpy(self.labels[i])}


def direct(system: nn.Module, size: int, k: int, args: argparse.Namespace, device: torch.device) -> list[float]:
    system.to(device).train()
    opts = system.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 1, size, size, generator=g) * 2 - 1).to(device)
    y = (torch.rand(args.batch_size, k, generator=g) > 0.6).float()
    y[torch.arange(args.batch_size), torch.randint(0, k, (args.batch_size,), generator=g)] = 1.0
    batch = {"x": x, "y": y.to(device)}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and args.amp) else nullcontext()
    times, s, start = [], 0, time.perf_counter()
    # warm-up: at least --warmup steps AND --warmup-seconds (on this shared VM a fresh process runs
    # its first seconds several times slower, whatever the model)
    while len(times) < args.steps:
        gen = torch.Generator(device=device).manual_seed(1000 + s)
        sync(device)
        t0 = time.perf_counter()
        with amp:
            system.training_step(batch, opts, step=s, generator=gen)
        sync(device)
        if s >= args.warmup and t0 - start >= args.warmup_seconds:
            times.append(time.perf_counter() - t0)
        s += 1
    return times


def through_fit(system: nn.Module, size: int, k: int, args: argparse.Namespace, device: torch.device) -> tuple[list[float], float]:
    stamps: list[float] = []

    def on_metrics(step: int, metrics: dict) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    ds = RandomImages(max(256, 4 * args.batch_size), size, k)
    total = args.warmup + args.steps
    t0 = time.perf_counter()
    fit(system, ds, LoopConfig(batch_size=args.batch_size, max_steps=total, device=device, seed=0, ema_decay=0.999,
                               amp=args.amp, balanced=True),
        logs=LogConfig(every=1, on_metrics=on_metrics, progress=False))
    wall = time.perf_counter() - t0
    intervals = [b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:])] if args.warmup >= 1 else \
        [b - a for a, b in zip(stamps, stamps[1:])]
    return intervals, wall


def loop_parts(system: nn.Module, size: int, k: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Median seconds of fit's per-step work besides training_step: batch indices + items + collate +
    to_batch, and the EMA update of G."""
    from cxrbase import balanced_weights, collate
    from generators.train import StepBatchSampler, make_ema, to_batch, update_ema

    ds = RandomImages(max(256, 4 * args.batch_size), size, k)
    sampler = StepBatchSampler(len(ds), args.batch_size, seed=0, stop_step=10**6,
                               weights=balanced_weights(ds.labels))
    system.to(device)
    ema = make_ema(system.G)
    out = {}
    for name, fn in (("batch (sampler + items + collate + to_batch)",
                      lambda s: to_batch(collate([ds[i] for i in sampler.batch(s)]), device)),
                     ("EMA update of G", lambda s: update_ema(ema, system.G, 0.999))):
        times = []
        for s in range(20):
            sync(device)
            t0 = time.perf_counter()
            fn(s)
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run (32 px, narrow nets, 3 steps)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", action="store_true", help="bf16 autocast around training_step on CUDA (fit's default there)")
    p.add_argument("--families", nargs="+", default=["cgan", "ucgan"], choices=["cgan", "ucgan"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--classes", default="Edema,Hernia,Effusion", help="sampler classes (UCGAN adds No Finding)")
    p.add_argument("--c-model", default="resnet18", help="classifier config of UCGAN's C (classifier=<name>)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-seconds", type=float, default=10.0, help="warm up for at least this long too")
    p.add_argument("--fit", default="cgan:64", help="family:px run also through generators.train.fit ('' = none)")
    p.add_argument("--fit-rounds", type=int, default=2, help="alternating direct / fit rounds for the fit comparison")
    p.add_argument("--only-fit", action="store_true", help="skip the per-family table, run only the fit comparison")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides (e.g. generator.g_channels=32)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.warmup, args.steps, args.c_model, args.warmup_seconds = [32], 1, 3, "tiny", 2.0
        args.override = [*args.override, "generator.g_channels=8", "generator.d_channels=8", "generator.z_dim=16"]
        args.fit, args.fit_rounds = "cgan:32", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    classes = [c.strip() for c in args.classes.split(",")]
    print(f"# bench_gan: {machine()}\n# command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"
          f"\n# load average (1, 5, 15 min) at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
          flush=True)
    header = ["family", "px", "widths", "params (G / D / C)", "batch", "how", "steps/s (median)", "ms/step (median)",
              "min - max ms", "images/s", "load before / after"]
    rows = []

    def add(family: str, size: int, mcfg: dict, system: nn.Module, how: str, times: list[float], la: str) -> None:
        med = statistics.median(times)
        counts = [sum(q.numel() for q in getattr(system, n).parameters()) / 1e6 for n in ("G", "D", "C") if hasattr(system, n)]
        rows.append([family, size, widths(mcfg), " / ".join(f"{c:.2f} M" for c in counts), args.batch_size, how,
                     f"{1 / med:.2f}", f"{med * 1000:,.0f}", f"{min(times) * 1000:,.0f} - {max(times) * 1000:,.0f}",
                     f"{args.batch_size / med:,.1f}", f"{la} / {loadavg()}"])
        print(table([rows[-1]], header).splitlines()[-1], flush=True)

    for family in ([] if args.only_fit else args.families):
        for size in args.sizes:
            system, mcfg = build_system(family, size, classes, args.c_model, args.override)
            la = loadavg()
            times = direct(system, size, len(mcfg["classes"]), args, device)
            add(family, size, mcfg, system, "training_step", times, la)
            del system
    fit_note = ""
    if args.fit:
        family, _, px = args.fit.partition(":")
        size = int(px)
        # direct and fit alternate, so both see the same machine load; medians pooled over the rounds
        direct_times, fit_times, walls = [], [], []
        la = loadavg()
        for _ in range(args.fit_rounds):
            system, mcfg = build_system(family, size, classes, args.c_model, args.override)
            direct_times += direct(system, size, len(mcfg["classes"]), args, device)
            system, mcfg = build_system(family, size, classes, args.c_model, args.override)
            intervals, wall = through_fit(system, size, len(mcfg["classes"]), args, device)
            fit_times += intervals
            walls.append(wall)
        add(family, size, mcfg, system, f"training_step, paired with fit ({args.fit_rounds} rounds)", direct_times, la)
        add(family, size, mcfg, system, f"fit: EMA 0.999, balanced ({args.fit_rounds} rounds)", fit_times, la)
        parts = loop_parts(system, size, len(mcfg["classes"]), args, device)
        fit_note = (f"\n\nfit vs direct: {args.fit_rounds} alternating rounds of {args.warmup} + {args.steps} steps; the fit "
                    "row is the median step-to-step interval after the warm-up (on_metrics time stamps); fit wall "
                    f"per round {', '.join(f'{w:.1f}' for w in walls)} s (incl. optimisers, EMA copy, warm-up). "
                    "The loop's own per-step work, measured alone (median of 20): "
                    + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in parts.items()) + ".")
    what = f"{args.device}" + (" bf16 autocast" if device.type == "cuda" and args.amp else " fp32")
    print(f"\nGAN training steps, {what}, batch {args.batch_size}; {args.warmup} warm-up steps (and >= {args.warmup_seconds:g} s) + "
          f"{args.steps} timed steps, "
          f"median\n\n" + table(rows, header) + fit_note)
    print(f"\n# load average (1, 5, 15 min) at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
