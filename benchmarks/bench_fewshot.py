"""Cost of the few-shot discriminator tools (issue 17): steps/s of every GAN family with and without
differentiable augmentation (DiffAugment policy, fixed p = 1, or adaptive) and LeCam.

Each family is built the way ``augment train`` builds it: the config composed by Hydra
(``generator=<family>`` or ``translator=<family>``, ``data.image_size=<px>``, the YAML's widths),
completed by ``augment.models.model_config`` and instantiated by ``augment.config.build``; the variants
differ only by the overrides below.  ``cgan-fastgan`` is CGAN with ``arch=fastgan``.

Variants: ``base`` (the YAML: tools off), ``aug`` (``fewshot.diffaug=translation,cutout,brightness,contrast``),
``ada`` (the same policy, adaptive p starting at 0.5), ``lecam`` (``fewshot.lecam_weight=0.1``) and ``aug+lecam``.

Timing: one fixed random batch per family; the variants' steps are *interleaved* (round r runs one
step of every variant, in a rotating order), so slow drifts of this shared machine hit all variants
alike; after ``--warmup`` rounds, ``--steps`` rounds are timed and the median step time is reported,
with the overhead of each variant relative to ``base``.  Two clocks: wall time and the process's CPU
time (``time.process_time``, all threads); on a machine shared with other jobs the CPU time is the
steadier one, and the comparison uses it.  ``in tools`` is measured inside the step: the CPU time
spent in the regulariser's forward calls (augmentation, ADA bookkeeping, LeCam) as a share of the
step, which does not depend on comparing two noisy step times (the backward through the augmentation,
a gather and element-wise ops, is not included).  Fixed-Point GAN updates G on one step in
``n_critic``: its steps are timed in groups of ``n_critic`` (the printed time is per step, averaged
over the group).

Usage::

    python benchmarks/bench_fewshot.py                       # every family at 64 px, CPU
    python benchmarks/bench_fewshot.py --sizes 64 128
    python benchmarks/bench_fewshot.py --quick               # seconds-long sanity run (32 px, narrow nets)
    python benchmarks/bench_fewshot.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.config import build, compose, to_dict  # noqa: E402
from augment.models import model_config  # noqa: E402
from benchmarks._machine import loadavg, machine  # noqa: E402

POLICY = "fewshot.diffaug=translation\\,cutout\\,brightness\\,contrast"
VARIANTS = {
    "base": [],
    "aug": [POLICY],
    "ada": [POLICY, "fewshot.diffaug_adaptive=true", "fewshot.diffaug_p=0.5"],
    "lecam": ["fewshot.lecam_weight=0.1"],
    "aug+lecam": [POLICY, "fewshot.lecam_weight=0.1"],
}
FAMILIES = {  # name -> (config group, config name, extra overrides)
    "cgan": ("generator", "cgan", []),
    "cgan-fastgan": ("generator", "cgan", ["arch=fastgan"]),
    "ucgan": ("generator", "ucgan", []),
    "fixed_point": ("translator", "fixed_point", []),
    "taggan": ("translator", "taggan", []),
    "branched": ("translator", "branched", []),
}
QUICK_WIDTHS = {"g_channels": 4, "d_channels": 4, "g_width": 4, "d_width": 4}


def build_system(family: str, size: int, variant: str, args: argparse.Namespace) -> tuple[nn.Module, dict]:
    group, name, extra = FAMILIES[family]
    over = [f"{group}={name}", f"data.image_size={size}", f"classifier={args.c_model}"]
    over += [f"{group}.{o}" for o in [*extra, *VARIANTS[variant]]]
    if args.quick:
        cfg0 = to_dict(compose(over))[group]
        over += [f"{group}.{k}={v}" for k, v in QUICK_WIDTHS.items() if k in cfg0]
    cfg = compose(over)
    classes = args.classes.split(",")
    mcfg = model_config(to_dict(cfg)[group], classes)
    torch.manual_seed(0)
    return build(mcfg), mcfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(system: nn.Module, size: int, b: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    k = len(system.classes)
    x = torch.rand(b * getattr(system, "real_batches_per_step", 1), 1, size, size, generator=g) * 2 - 1
    y = (torch.rand(x.shape[0], k, generator=g) > 0.6).float()
    return {"x": x.to(device), "y": y.to(device)}


def instrument(system: nn.Module, spent: list[float]) -> None:
    """Accumulate the CPU time of every regulariser call of ``system`` into ``spent[0]``."""
    from generators.adversarial import DiscriminatorRegulariser

    for reg in [m for m in system.modules() if isinstance(m, DiscriminatorRegulariser)]:
        for name in ("augment", "observe", "penalty"):
            fn = getattr(reg, name)

            def timed(*a, _fn=fn, **kw):
                t0 = time.process_time()
                try:
                    return _fn(*a, **kw)
                finally:
                    spent[0] += time.process_time() - t0

            setattr(reg, name, timed)


def bench_family(family: str, size: int, args: argparse.Namespace, device: torch.device) -> list[list]:
    systems = {}
    spent = {v: [0.0] for v in args.variants}
    for v in args.variants:
        system, _ = build_system(family, size, v, args)
        system.to(device).train()
        instrument(system, spent[v])
        systems[v] = (system, system.configure_optimizers(), make_batch(system, size, args.batch_size, device))
    group = int(getattr(next(iter(systems.values()))[0], "n_critic", 1)) if family == "fixed_point" else 1
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    cpu: dict[str, list[float]] = {v: [] for v in args.variants}
    tools: dict[str, list[float]] = {v: [] for v in args.variants}
    steps = {v: 0 for v in args.variants}
    la0 = loadavg()
    order = list(args.variants)
    for r in range(args.warmup + args.steps):
        order = order[1:] + order[:1]  # rotate, so no variant always runs first
        for v in order:
            system, opts, batch = systems[v]
            sync(device)
            spent[v][0] = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(group):
                gen = torch.Generator(device=device).manual_seed(1000 + steps[v])
                system.training_step(batch, opts, step=steps[v], generator=gen)
                steps[v] += 1
            sync(device)
            if r >= args.warmup:
                times[v].append((time.perf_counter() - t0) / group)
                c = (time.process_time() - c0) / group
                cpu[v].append(c)
                tools[v].append(spent[v][0] / group / c)
    rows = []
    base = statistics.median(cpu["base"])
    for v in args.variants:
        wall, med = statistics.median(times[v]), statistics.median(cpu[v])
        rows.append([family, size, v, f"{wall * 1000:.0f}", f"{med * 1000:.0f}", f"{1 / med:.2f}",
                     f"{100 * (med / base - 1):+.1f} %", f"{100 * statistics.median(tools[v]):.1f} %",
                     f"{la0}/{loadavg()}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run (32 px, narrow nets, 2 steps)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--sizes", type=int, nargs="+", default=[64])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--classes", default="Edema,Hernia", help="classes (UCGAN adds No Finding)")
    p.add_argument("--c-model", default="resnet18", help="classifier config of UCGAN's C")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if "base" not in args.variants:
        args.variants = ["base", *args.variants]
    if args.quick:
        args.sizes, args.steps, args.warmup, args.batch_size = [32], 2, 1, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# few-shot tools: {machine()}; batch {args.batch_size}; {args.steps} timed rounds after {args.warmup}")
    header = ["family", "px", "variant", "wall ms/step", "CPU ms/step", "steps/s (CPU)", "vs base (CPU)",
              "in tools (CPU)", "load 1m"]
    print("| " + " | ".join(header) + " |")
    print("| " + " | ".join("---" for _ in header) + " |")
    for size in args.sizes:
        for family in args.families:
            for row in bench_family(family, size, args, device):
                print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
