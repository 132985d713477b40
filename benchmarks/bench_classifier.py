"""Classifier-stage throughput: data loading (uint8 cache vs PNG decoding) and timm train/inference.

Part A, data loading: images/s reading training batches of the shared real set through
``augment.data.sources.load_table`` -> ``XrayDataset`` -> ``torch.utils.data.DataLoader`` (the uint8
cache, memory-mapped), against a plain Dataset that opens and decodes every PNG with PIL on every
access (the same files, same collate, same batch size), for each ``--workers`` value. The first
pass over the PNGs warms the OS page cache, so the PNG figures measure decoding, not the disk.

Part B, models: training images/s (forward + masked BCE + backward + AdamW step, the step of
``classifiers.train.train_classifier``) and inference images/s (eval, no_grad) of
``classifiers.model.create_classifier(model, in_chans=1)`` on random inputs, for each model and
size: ``--warmup`` untimed steps, then ``--steps`` individually timed steps; the median step time
is reported (and the spread: min / max).

Every table row carries the 1-minute load average read before and after it (``/proc/loadavg``).

Usage::

    python benchmarks/bench_classifier.py                      # both parts, CPU, defaults below
    python benchmarks/bench_classifier.py --quick              # seconds-long sanity run
    python benchmarks/bench_classifier.py --device cuda --amp  # on a GPU (bf16 autocast, channels_last)
    python benchmarks/bench_classifier.py --part models --models resnet18 --sizes 64
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from augment.config import compose  # noqa: E402
from augment.data.labels import canonical  # noqa: E402
from augment.data.sources import load_table  # noqa: E402
from augment.data.table import XrayDataset, select_labels  # noqa: E402
from classifiers.model import count_parameters, create_classifier  # noqa: E402
from classifiers.train import masked_bce_with_logits  # noqa: E402
from cxrbase import collate  # noqa: E402
from benchmarks._machine import loadavg, machine  # noqa: E402
from augment.common import markdown_table as table  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cxr-real"


# ------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------- part A
class PngDataset(Dataset):
    """The same rows as an :class:`XrayDataset`, decoded from the PNG files on every access."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray, size: int) -> None:
        self.root, self.files, self.labels, self.size = root, files, labels.astype(np.float32), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        with Image.open(self.root / self.files[i]) as img:
            img = img.convert("L")
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
        return {"image": torch.from_numpy(arr.copy())[None], "labels": torch.from_numpy(self.labels[i].copy()),
                "index": i}


def loader_rate(ds: Dataset, batch_size: int, workers: int, max_batches: int, seed: int) -> tuple[float, int, float]:
    """(images/s over the timed batches, images timed, seconds to the first batch).

    The first batch (worker start-up) is excluded from the rate and reported separately."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, generator=torch.Generator().manual_seed(seed))
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for k, batch in enumerate(it):
        n += len(batch["image"])
        if k + 1 >= max_batches:
            break
    seconds = time.perf_counter() - t1
    del it, loader
    return (n / seconds if seconds > 0 else float("nan")), n, first


def bench_data(args: argparse.Namespace) -> str:
    classes = [canonical(c) for c in args.classes.split(",")]
    cfg = OmegaConf.merge(compose(["data=folder"]).data,
                          {"root": str(args.root), "image_size": args.data_size, "include": args.include,
                           "cache_dir": args.cache_dir})
    la0 = loadavg()
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    cache_log = logging.getLogger("augment.data.cache")
    handler, level = Catch(), cache_log.level
    cache_log.addHandler(handler)
    cache_log.setLevel(logging.INFO)
    t0 = time.perf_counter()
    table_ = load_table(cfg, show_progress=False)
    first_load = time.perf_counter() - t0
    cache_log.removeHandler(handler)
    cache_log.setLevel(level)
    built = any("written" in m for m in seen)
    t0 = time.perf_counter()
    table_ = load_table(cfg, show_progress=False)
    warm_load = time.perf_counter() - t0
    idx = table_.indices("train")
    if args.limit:
        idx = idx[: args.limit]
    cached = XrayDataset(table_, idx, classes)
    png = PngDataset(Path(args.root).resolve(), [str(table_.files[i]) for i in idx], select_labels(table_.labels[idx], classes), args.data_size)
    print(f"\nload_table ({len(table_)} images, {args.data_size} px, include={args.include}): first call "
          f"{first_load:.2f} s ({'built the cache entry' if built else 'cache hit'}), second call {warm_load:.3f} s; "
          f"train split {len(idx)} images; load {la0} -> {loadavg()}", flush=True)
    # warm the page cache for the PNGs, so the comparison is decoding, not the disk
    for f in png.files:
        (png.root / f).read_bytes()
    rows = []
    for workers in args.workers:
        for name, ds in (("uint8 cache (XrayDataset)", cached), ("PNG decode (PIL)", png)):
            rates, firsts = [], []
            la_before = loadavg()
            for r in range(args.repeats):
                rate, n, first = loader_rate(ds, args.batch_size, workers, args.batches, seed=r)
                rates.append(rate)
                firsts.append(first)
            rows.append([name, workers, args.batch_size, n, f"{statistics.median(rates):,.0f}",
                         f"{min(rates):,.0f} - {max(rates):,.0f}", f"{statistics.median(firsts) * 1000:.0f}",
                         f"{la_before} / {loadavg()}"])
            print(table([rows[-1]], ["reader", "num_workers", "batch", "images/repeat", "images/s (median)",
                                     "min - max", "first batch ms", "load before / after"]).splitlines()[-1], flush=True)
    header = ["reader", "num_workers", "batch", "images/repeat", "images/s (median)", "min - max",
              "first batch ms", "load before / after"]
    return (f"Data loading, {args.data_size} px, {len(idx)} train images of {args.root} include={args.include}; "
            f"median of {args.repeats} repeats of {args.batches} batches after the first batch "
            f"(load_table first call {first_load:.2f} s, {'building the cache entry' if built else 'a cache hit'}; "
            f"warm {warm_load:.3f} s)\n\n" + table(rows, header))


# --------------------------------------------------------------------------------------- part B
def bench_models(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (cuda and args.amp) else nullcontext()
    rows = []
    for model_name in args.models:
        for size in args.sizes:
            torch.manual_seed(0)
            model = create_classifier(model_name, num_classes=args.num_classes, in_chans=1).to(device)
            if cuda:
                model = model.to(memory_format=torch.channels_last)
            params = count_parameters(model)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
            g = torch.Generator().manual_seed(0)
            x = (torch.rand(args.batch_size, 1, size, size, generator=g) * 2 - 1).to(device)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            y = (torch.rand(args.batch_size, args.num_classes, generator=g) > 0.7).float().to(device)

            def train_step() -> None:
                with amp:
                    logits = model(x)
                loss = masked_bce_with_logits(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def infer_step() -> None:
                with torch.no_grad(), amp:
                    model(xi)

            la_before = loadavg()
            model.train()
            start, k = time.perf_counter(), 0
            # at least --warmup steps AND --warmup-seconds: a fresh process on this shared VM runs its first
            # seconds several times slower
            while k < args.warmup or time.perf_counter() - start < args.warmup_seconds:
                timed(train_step, device)
                k += 1
            train_times = [timed(train_step, device) for _ in range(args.steps)]
            model.eval()
            xi = (torch.rand(args.infer_batch, 1, size, size, generator=g) * 2 - 1).to(device)
            if cuda:
                xi = xi.contiguous(memory_format=torch.channels_last)
            for _ in range(max(1, args.warmup // 2)):
                timed(infer_step, device)
            infer_times = [timed(infer_step, device) for _ in range(args.steps)]
            la_after = loadavg()
            tm, im = statistics.median(train_times), statistics.median(infer_times)
            rows.append([model_name, f"{params / 1e6:.1f} M", size, args.batch_size,
                         f"{args.batch_size / tm:,.1f}", f"{args.batch_size / max(train_times):,.1f} - {args.batch_size / min(train_times):,.1f}",
                         f"{tm * 1000:,.0f}", args.infer_batch, f"{args.infer_batch / im:,.1f}",
                         f"{la_before} / {la_after}"])
            print(table([rows[-1]], ["model"] * 10).splitlines()[-1], flush=True)
            del model, opt
    header = ["model", "params", "px", "train batch", "train images/s (median)", "train min - max", "ms/step",
              "infer batch", "infer images/s (median)", "load before / after"]
    what = f"{args.device}" + (" bf16 autocast + channels_last" if cuda and args.amp else " fp32")
    return (f"Classifier train (fwd + masked BCE + bwd + AdamW) and inference, {what}; {args.warmup} warm-up steps "
            f"(and >= {args.warmup_seconds:g} s) + {args.steps} timed steps each, median\n\n" + table(rows, header))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "data", "models"], default="all")
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run (tiny sizes and counts)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (part B; part A always reads on the CPU)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA, as the training loop does")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    # part A
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="data=folder root (labels.csv)")
    p.add_argument("--include", nargs="*", default=["images/kermany_pneumonia/"], help="data.include prefixes")
    p.add_argument("--classes", default="pneumonia,no finding")
    p.add_argument("--data-size", type=int, default=128)
    p.add_argument("--cache-dir", default=None, help="data cache folder (default: $AUGMENT_CACHE_DIR or ~/.cache/augment)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers values")
    p.add_argument("--batches", type=int, default=60, help="timed batches per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="use only the first N train rows (0 = all)")
    # part B
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--infer-batch", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-seconds", type=float, default=10.0, help="warm up for at least this long too")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.sizes, args.warmup, args.steps, args.warmup_seconds = ["tiny"], [32], 1, 3, 1.0
        args.batches, args.repeats, args.workers, args.limit = 5, 1, [0], 400
        args.include, args.classes = ["images/jsrt/"], "nodule,no finding"
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_classifier: {machine()}\n# command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"
          f"\n# load average (1, 5, 15 min) at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
          flush=True)
    out = []
    if args.part in ("all", "data"):
        out.append(bench_data(args))
    if args.part in ("all", "models"):
        out.append(bench_models(args))
    print("\n" + "\n\n".join(out))
    print(f"\n# load average (1, 5, 15 min) at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
