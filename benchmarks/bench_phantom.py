"""Phantom rendering throughput: ``augment.data.phantom.render_many`` in one process.

Reports, per size, images/s by wall clock and by CPU time of this process (the second is what
one core delivers when other work shares the machine), best and median over ``--repeats`` runs,
with the load average of the machine during the runs. Default prevalence and healthy fraction,
so the mix of findings is the one a default data source renders.

Usage::

    python benchmarks/bench_phantom.py                     # 64 and 128 px, 1000 images, 3 repeats
    python benchmarks/bench_phantom.py --size 128 --n 2000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.data import phantom  # noqa: E402


def bench(size: int, n: int, repeats: int, seed: int) -> dict[str, float]:
    """Render ``n`` images ``repeats`` times; images/s by wall clock and by process CPU time."""
    phantom.render_many(8, seed=seed, size=size)  # warm the grid caches
    wall, cpu, load = [], [], []
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        phantom.render_many(n, seed=seed, size=size, start=r * n)
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / (time.process_time() - c0))
        load.append(os.getloadavg()[0])
    return {
        "wall_best": max(wall),
        "wall_median": statistics.median(wall),
        "cpu_best": max(cpu),
        "cpu_median": statistics.median(cpu),
        "load": statistics.mean(load),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs="+", default=[64, 128], help="image sizes (default 64 128)")
    parser.add_argument("--n", type=int, default=1000, help="images per run (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.platform()}")
    print(f"render_many(n={args.n}, seed={args.seed}), default prevalence, best / median of {args.repeats}")
    print("| size | images/s (wall) best / median | images/s (process CPU) best / median "
          "| load avg (1 min) |")
    print("| ---: | ---: | ---: | ---: |")
    for size in args.size:
        r = bench(size, args.n, args.repeats, args.seed)
        print(f"| {size} | {r['wall_best']:.0f} / {r['wall_median']:.0f} | "
              f"{r['cpu_best']:.0f} / {r['cpu_median']:.0f} | {r['load']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
