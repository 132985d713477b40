"""FID throughput: ours (augment.metrics.fid) vs ``python -m pytorch_fid`` on the same folders.

Both use the same stand-in FID Inception weights (random, seeded; the real file cannot be
downloaded here), written where pytorch-fid looks (``$TORCH_HOME/hub/checkpoints``), so the two
compute the same network and their values must agree. Reports, in one run:

* wall and CPU time (user + sys, all threads / child processes) and mean load average of
  ``python -m pytorch_fid SYN REAL --device D --batch-size B`` (whole command),
* ours, cold: ``fid_folders(SYN, REAL, InceptionExtractor(), B, cache=...)`` incl. building the
  extractor, empty statistics cache,
* ours, warm: the same call again with the real folder's statistics cached and the synthetic
  folder's recomputed (the situation of every evaluation after the first),
* both FID values and their relative difference,
* DomainExtractor (timm resnet18, in_chans=1, random init) features/s at 64 and 128 px.

Usage::

    python benchmarks/bench_fid.py --n 2048 --size 64 --workdir /tmp/bench_fid
    python benchmarks/bench_fid.py --n 2048 --from-dir ../shared/data/cxr-real/images/kermany_pneumonia/train

``--from-dir`` takes 2n PNGs from a folder tree (sorted): the first n as "real", the next n as
"synthetic"; otherwise random smooth grayscale images are generated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "metrics"))  # the stand-in weights writer the FID tests use

from augment.metrics.fid import (  # noqa: E402
    FID_WEIGHTS_FILE,
    DomainExtractor,
    InceptionExtractor,
    RealStatsCache,
    features,
    fid_folders,
)
from fid_weights import random_fid_inception_weights  # noqa: E402


def make_random_folder(folder: Path, n: int, size: int, seed: int, brightness: float) -> None:
    """n random smooth grayscale PNGs: 8 x 8 noise upsampled bilinearly to size x size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, size=(8, 8)) * (1 - brightness) + 255 * brightness
        Image.fromarray(low.astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR).save(
            folder / f"{i:05d}.png")


def link_folders(src: Path, real: Path, syn: Path, n: int) -> None:
    """Symlink 2n sorted PNGs from src: the first n into real, the next n into syn."""
    files = sorted(src.rglob("*.png"))
    if len(files) < 2 * n:
        raise SystemExit(f"{src} holds {len(files)} PNGs, need {2 * n}")
    for folder, chunk in ((real, files[:n]), (syn, files[n:2 * n])):
        folder.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(chunk):
            (folder / f"{i:05d}.png").symlink_to(f.resolve())


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Timer:
    """Wall time, CPU time (user + sys, this process's threads or its children) and load."""

    def __init__(self, children: bool = False) -> None:
        self.children = children

    def __enter__(self) -> Timer:
        self.load0 = os.getloadavg()[0]
        self.cpu0 = _children_cpu() if self.children else time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = (_children_cpu() if self.children else time.process_time()) - self.cpu0
        self.load = (self.load0 + os.getloadavg()[0]) / 2

    def as_dict(self) -> dict[str, float]:
        return {"wall_s": self.wall, "cpu_s": self.cpu, "load": self.load}


def run_pytorch_fid(syn: Path, real: Path, torch_home: Path, device: str, batch_size: int) -> tuple[Timer, float]:
    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    cmd = [sys.executable, "-m", "pytorch_fid", str(syn), str(real), "--device", device,
           "--batch-size", str(batch_size)]
    with Timer(children=True) as timer:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pytorch_fid failed:\n{proc.stderr[-3000:]}")
    if "Downloading" in proc.stdout + proc.stderr:
        raise SystemExit("pytorch_fid tried to download weights")
    m = re.search(r"^FID:\s+(\S+)\s*$", proc.stdout, flags=re.M)
    if not m:
        raise SystemExit(f"no FID line in pytorch_fid output:\n{proc.stdout[-2000:]}")
    return timer, float(m.group(1))


def import_overhead() -> float:
    """Wall time of starting Python and importing what ``python -m pytorch_fid`` imports."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pytorch_fid.fid_score"], check=True)
    return time.perf_counter() - t


def domain_throughput(size: int, n: int, batch_size: int, device: str) -> float:
    import timm

    torch.manual_seed(0)  # a script, not the library: fixing the global seed is fine here
    model = timm.create_model("resnet18", in_chans=1, num_classes=15, pretrained=False)
    ex = DomainExtractor(model, sha256=None, name="bench").to(device)
    imgs = np.random.default_rng(0).integers(0, 256, size=(n, size, size), dtype=np.uint8)
    features(ex, imgs[:batch_size], batch_size)  # warm-up (allocator, kernel selection)
    t = time.perf_counter()
    features(ex, imgs, batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048, help="images per folder")
    ap.add_argument("--size", type=int, default=64, help="generated image size (ignored with --from-dir)")
    ap.add_argument("--from-dir", type=Path, default=None, help="take 2n real PNGs from this tree instead")
    ap.add_argument("--batch-size", type=int, default=50, help="same for both (pytorch-fid's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=2, help="our PNG decoding threads")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_fid"))
    ap.add_argument("--domain-n", type=int, default=512, help="images per DomainExtractor measurement")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    work = args.workdir
    if work.exists():
        shutil.rmtree(work)
    real, syn = work / "real", work / "synthetic"
    if args.from_dir is not None:
        link_folders(args.from_dir, real, syn, args.n)
        data = f"{args.n} + {args.n} PNGs from {args.from_dir}"
    else:
        make_random_folder(real, args.n, args.size, seed=0, brightness=0.0)
        make_random_folder(syn, args.n, args.size, seed=1, brightness=0.2)
        data = f"{args.n} + {args.n} random smooth grayscale PNGs, {args.size} px"
    torch_home = work / "torch"
    weights = random_fid_inception_weights(torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILE, seed=0)
    print(f"data: {data}; torch threads: {torch.get_num_threads()}", flush=True)

    overhead = import_overhead()
    theirs_t, theirs_fid = run_pytorch_fid(syn, real, torch_home, args.device, args.batch_size)
    print(f"pytorch-fid: {theirs_t.as_dict()}, FID {theirs_fid:.6f}", flush=True)

    cache = RealStatsCache(work / "stats-cache")
    with Timer() as cold_t:
        ex = InceptionExtractor(weights, device=args.device)
        cold = fid_folders(syn, real, ex, args.batch_size, cache=cache, num_workers=args.num_workers)
    print(f"ours cold: {cold_t.as_dict()}, FID {cold.value:.6f}", flush=True)

    # Next evaluation: new synthetic statistics (its cache entry dropped), real ones from the cache.
    cache.path(str(syn.resolve()), ex.id).unlink()
    with Timer() as warm_t:
        ex = InceptionExtractor(weights, device=args.device)
        warm = fid_folders(syn, real, ex, args.batch_size, cache=cache, num_workers=args.num_workers)
    assert cache.hits == 1 and cache.misses == 3, (cache.hits, cache.misses)
    print(f"ours warm (real statistics cached): {warm_t.as_dict()}, FID {warm.value:.6f}", flush=True)

    domain = {s: domain_throughput(s, args.domain_n, 64, args.device) for s in (64, 128)}
    for s, v in domain.items():
        print(f"DomainExtractor resnet18 at {s} px: {v:.0f} features/s", flush=True)

    figures = {
        "data": data, "device": args.device, "batch_size": args.batch_size,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "pytorch_fid": theirs_t.as_dict(), "pytorch_fid_import_s": overhead, "pytorch_fid_value": theirs_fid,
        "ours_cold": cold_t.as_dict(), "ours_warm": warm_t.as_dict(),
        "ours_value": cold.value, "ours_warm_value": warm.value,
        "ratio_cold_wall": cold_t.wall / theirs_t.wall, "ratio_warm_wall": warm_t.wall / theirs_t.wall,
        "ratio_cold_cpu": cold_t.cpu / theirs_t.cpu, "ratio_warm_cpu": warm_t.cpu / theirs_t.cpu,
        "rel_diff": abs(cold.value - theirs_fid) / abs(theirs_fid),
        "extractor_id": ex.id, "domain_features_per_s": domain,
    }
    print(json.dumps(figures, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
