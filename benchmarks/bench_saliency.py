"""Mask-source throughput: maps/s of the random control, Grad-CAM, Grad-CAM++ (timm ResNet) and a translator.

Each source turns a fixed batch of random uint8 images into evidence maps exactly as ``augment evaluate``
does (:mod:`augment.jobs.saliency`: ``maps`` for one finding), then, separately, the ``mask.*`` rule
(default otsu, smoothing 1, min_area 4) turns the maps into masks.  ``--warmup`` untimed rounds, then
``--rounds`` timed rounds; maps/s = images per round / median round time.  The translator is built as
``augment train translator=<family>`` builds it (untrained: speed does not depend on its weights) and its
translation cache is cleared before each round.

Usage::

    python benchmarks/bench_saliency.py                      # 128 px, resnet18 + resnet50, fixed_point, CPU
    python benchmarks/bench_saliency.py --quick              # seconds-long sanity run (32 px, tiny)
    python benchmarks/bench_saliency.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.config import build, compose, to_dict  # noqa: E402
from augment.jobs.saliency import CamMaps, RandomMaps, TranslatorMaps, maps_to_masks  # noqa: E402
from augment.models import model_config  # noqa: E402
from bench_gan import loadavg, machine, sync, table  # noqa: E402
from classifiers.model import create_classifier  # noqa: E402

CLASSES = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
RULE = {"rule": "otsu", "threshold": 0.1, "percentile": 95.0, "min_area": 4, "smooth_sigma": 1.0}


def timed(fn, rounds: int, warmup: int, device: torch.device) -> tuple[float, object]:
    out = None
    times = []
    for r in range(warmup + rounds):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        if r >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run (32 px, tiny model, 1 round)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--translator", default="fixed_point", help="translator family ('none' to skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.models, args.rounds, args.warmup = 32, 8, ["tiny"], 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, size = args.batch_size, args.size
    images = np.random.default_rng(0).integers(0, 256, (n, size, size), dtype=np.uint8)
    keys = np.arange(n)
    sources = [("random", RandomMaps(seed=0))]
    for name in args.models:
        model = create_classifier(name, num_classes=len(CLASSES), init_seed=0)
        for variant in ("gradcam", "gradcam_pp"):
            sources.append((f"{variant} ({name})", CamMaps(model, CLASSES, variant=variant, batch_size=n, device=device)))
    if args.translator != "none":
        cfg = compose([f"translator={args.translator}", f"data.image_size={size}"])
        system = build(model_config(to_dict(cfg.translator), CLASSES)).to(device).eval()
        sources.append((f"{args.translator} (default widths, untrained)", TranslatorMaps(args.translator, system, batch_size=n)))
    rows = []
    for label, src in sources:
        before = loadavg()

        def run(src=src):
            if isinstance(src, TranslatorMaps):
                src._cache.clear()
            return src.maps(images, "Effusion", keys)

        t_map, maps = timed(run, args.rounds, args.warmup, device)
        t_mask, _ = timed(lambda: maps_to_masks(maps, RULE, normalise=src.normalise), args.rounds, args.warmup, device)
        rows.append([label, f"{n / t_map:.1f}", f"{n / t_mask:.1f}", f"{n / (t_map + t_mask):.1f}", f"{before} / {loadavg()}"])
    print(f"Machine: {machine()}; device {device}; {size} px, batch {n}, median of {args.rounds} rounds")
    print(f"Command: python benchmarks/bench_saliency.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    print(table(rows, ["source", "maps/s", "masks/s (rule only)", "maps+masks/s", "load before / after"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
