"""Translator training throughput: ``training_step`` steps/s of Fixed-Point GAN, TagGAN and Branched GAN.

The systems are built as ``augment train translator=<family>`` builds them (Hydra-composed config,
``--override`` for widths, e.g. the quickstart's ``translator.g_width=16 translator.d_width=16``),
and timed on one fixed random batch (speed does not depend on the pixel values): ``--warmup``
untimed steps, then ``--steps`` timed steps; steps/s is their count over their total time (not a
median: Fixed-Point GAN updates G on one step in ``n_critic``, so its steps differ in cost; keep
``--steps`` a multiple of 5), with images/s (batch x steps/s) and the 1-minute load average before
and after each row.

Usage::

    python benchmarks/bench_translators.py --threads 1 2          # 64 and 128 px, quickstart widths, CPU
    python benchmarks/bench_translators.py --quick                # seconds-long sanity run
    python benchmarks/bench_translators.py --device cuda --amp --threads 0 --no-quickstart-widths
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.config import build, compose, to_dict  # noqa: E402
from augment.models import model_config  # noqa: E402
from bench_gan import loadavg, machine, sync, table  # noqa: E402

QUICKSTART = {"fixed_point": ["translator.g_width=16", "translator.d_width=16", "translator.n_res=2"],
              "taggan": ["translator.g_width=16", "translator.d_width=16", "translator.n_res=2"],
              "branched": ["translator.g_width=16", "translator.d_width=16"]}


def build_translator(family: str, size: int, classes: list[str], overrides: list[str]) -> torch.nn.Module:
    cfg = compose([f"translator={family}", f"data.image_size={size}", *overrides])
    torch.manual_seed(0)
    return build(model_config(to_dict(cfg.translator), classes))


def time_steps(system: torch.nn.Module, size: int, k: int, args: argparse.Namespace, device: torch.device) -> list[float]:
    system.to(device).train()
    opts = system.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch_size, 1, size, size, generator=g) * 2 - 1).to(device)
    y = (torch.rand(args.batch_size, k, generator=g) < 0.3).float().to(device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and args.amp) else nullcontext()
    times = []
    for s in range(args.warmup + args.steps):
        gen = torch.Generator(device=device).manual_seed(1000 + s)
        sync(device)
        t0 = time.perf_counter()
        with amp:
            system.training_step({"x": x, "y": y}, opts, step=s, generator=gen)
        sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run (32 px, 2 steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--families", nargs="+", default=["fixed_point", "taggan", "branched"],
                   choices=["fixed_point", "taggan", "branched"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classes", default="Edema,Hernia,Pneumonia,Effusion,Mass")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads per row (0 = leave as is)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-quickstart-widths", action="store_true", help="the configs' default widths instead")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every family")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.warmup, args.steps, args.threads = [32], 1, 2, [0]
    device = torch.device(args.device)
    classes = [c.strip() for c in args.classes.split(",")]
    rows = []
    for threads in args.threads:
        if threads:
            torch.set_num_threads(threads)
        for size in args.sizes:
            for fam in args.families:
                ov = ([] if args.no_quickstart_widths else QUICKSTART[fam]) + list(args.override)
                system = build_translator(fam, size, classes, ov)
                before = loadavg()
                times = time_steps(system, size, len(classes), args, device)
                per_step = sum(times) / len(times)  # mean seconds per step
                rows.append([fam, size, torch.get_num_threads(), args.batch_size, f"{1 / per_step:.2f}",
                             f"{args.batch_size / per_step:.1f}", f"{before} / {loadavg()}"])
                print(f"{fam} {size}px {torch.get_num_threads()} threads: {1 / per_step:.2f} steps/s", file=sys.stderr, flush=True)
    print(f"Machine: {machine()}; device {device}{' (bf16 autocast)' if args.amp and device.type == 'cuda' else ''}")
    print(f"Command: python benchmarks/bench_translators.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(table(rows, ["family", "px", "threads", "batch", "steps/s", "images/s", "load 1 min before / after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
