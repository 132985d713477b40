"""Generation throughput of ``augment generate``: images/s with and without masks, by batch size,
workers and image size, and where the time goes.

1. Models. ``augment generate`` needs trained models; speed depends on the widths, not on how well
   they are trained, so unless ``--models PX=DIR`` names existing train runs, this script trains
   small-data, few-step models at the *default widths* with ``augment train`` (one run per size):
   CGAN sampler (``configs/generator/cgan.yaml``: z 128, G 64, D 64), Fixed-Point GAN translator
   (``configs/translator/fixed_point.yaml``: g_width 64, d_width 64, 2 down, 6 residual blocks) and
   the CGAN's pseudo-labeller (``classifier=`` ``--labeller``, default resnet50, the default of
   ``configs/augment.yaml``), on the phantom (``data.n=300``), ``runtime=inline``. The exact
   command is printed. (A translator trained for only a few steps can give a batch whose mask rule
   selects no pixel, which stops ``augment generate``; hence the raised learning rates below.)
2. Runs. ``augment generate --models DIR --classes edema,hernia --n N --threshold T --batch-size B
   --workers W [--translator none]`` as a subprocess (the whole command: start-up, Ray, model loading,
   assembly), for every combination of ``--sizes``, ``--translators``, ``--batch-sizes`` and
   ``--workers``; ``--repeats`` times each (median). Each row gives the wall time of the command,
   the stage's own ``seconds`` / ``images_per_second`` (from its ``metrics.json``: pool start-up to
   the end of ``finalize``) and the stage's per-part timings (sample, label, translate, write; summed
   over shards, so with 2 workers they add up to more than the wall time).
3. Parts (``--parts``). Micro-benchmarks of the per-image work inside ``ShardWorker.run``: the
   per-sample noise construction (``derive_seed`` + ``torch.Generator`` + ``randn`` per row) against
   one batched ``randn``; PNG encoding of an image and of a mask with the stage's ``write_png`` (PIL,
   ``compress_level=6``) against ``compress_level=1``; and ``generators.masks.diff_to_mask`` with the
   default mask settings (otsu, smooth_sigma 1, min_area 4) per image.

Every row carries the 1-minute load average before and after it (``/proc/loadavg``).

Usage::

    python benchmarks/bench_generate.py --quick                      # seconds-long sanity run (32 px, tiny nets)
    python benchmarks/bench_generate.py --workdir /tmp/bench_generate  # trains 64 + 128 px models, then the matrix
    python benchmarks/bench_generate.py --models 64=/tmp/bench_generate/models-64 --sizes 64 --big-n 10000
    python benchmarks/bench_generate.py --device cuda --sizes 128 --batch-sizes 256 1024 --n 20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import loadavg, machine  # noqa: E402
from augment.common import markdown_table as table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARTS = ("sample", "label", "translate", "write")
ENV = dict(os.environ)  # --threads sets OMP_NUM_THREADS here for the augment commands


def augment_cmd() -> list[str]:
    script = Path(sys.executable).parent / "augment"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from augment.cli import main; sys.exit(main())"]


def shown(cmd: list[str]) -> str:
    return " ".join(["augment", *cmd[len(augment_cmd()):]])


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run a command; (wall seconds, CPU seconds user + sys of the process and its waited-for children).

    Ray workers are not children of the command, so with ``--workers`` > 1 their CPU time is missing."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=ENV)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"command failed ({proc.returncode}): {shown(cmd)}\n{tail}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# ------------------------------------------------------------------------------------------ models
def train_models(size: int, args: argparse.Namespace) -> tuple[Path, str, float]:
    out = args.workdir / f"models-{size}"
    widths = (["generator.g_channels=8", "generator.d_channels=8", "generator.z_dim=16", "translator.g_width=8",
               "translator.d_width=8", "translator.n_res=1"] if args.quick else [])
    cmd = [*augment_cmd(), "train", "--out", str(out), "--classes", args.classes, "generator=cgan",
           "translator=fixed_point", f"classifier={args.labeller}", f"data.image_size={size}", "data.n=300",
           f"train.max_steps={args.train_steps}", f"train.batch_size={args.train_batch}", "train.ckpt_every=100000",
           "train.sample_every=null", "train.min_images_per_class=4", "classify.epochs=1",
           "generator.lr_g=1e-3", "translator.lr_g=1e-3", "translator.lr_d=1e-3",
           f"train.device={args.device}", f"classify.device={args.device}", "runtime=inline", *widths]
    if (out / "models" / "cgan" / "checkpoint.pt").is_file() and (out / "models" / "fixed_point" / "checkpoint.pt").is_file():
        return out, shown(cmd) + "   (reused)", 0.0
    shutil.rmtree(out, ignore_errors=True)
    seconds, _ = run(cmd, args.workdir / f"train-{size}.log")
    return out, shown(cmd), seconds


def describe_models(models: Path) -> str:
    from generators.checkpoint import load_checkpoint

    parts = []
    for fam in ("cgan", "fixed_point"):
        ck = load_checkpoint(models / "models" / fam / "checkpoint.pt")
        c = ck["model_cfg"]
        keys = ("z_dim", "g_channels", "d_channels") if fam == "cgan" else ("g_width", "d_width", "n_down", "n_res")
        parts.append(f"{fam} " + " ".join(f"{k}={c.get(k)}" for k in keys) + f" ({ck['step']} steps)")
    best = sorted((models / "models" / "classifier").glob("**/best.pt"))
    if best:
        ck = torch.load(best[0], map_location="cpu", weights_only=True)
        parts.append(f"labeller {ck['model_cfg']['model_name']}")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------- runs
def generate_once(models: Path, size: int, translator: str, batch: int, workers: int, n: int, args: argparse.Namespace,
                  tag: str) -> tuple[dict, float, float, list[str]]:
    out = args.workdir / "out" / tag
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*augment_cmd(), "generate", "--models", str(models), "--classes", args.classes, "--n", str(n),
           "--threshold", str(args.threshold), "--batch-size", str(batch), "--workers", str(workers),
           "--translator", translator, "--out", str(out), f"generate.device={args.device}",
           f"runtime={'inline' if workers == 1 else 'local'}", "progress=false",
           *([f"generate.shard_size={args.shard_size}"] if args.shard_size else [])]
    wall, cpu = run(cmd, args.workdir / f"{tag}.log")
    metrics = json.loads((out / "metrics.json").read_text())
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return metrics, wall, cpu, cmd


def bench_runs(models_by_size: dict[int, Path], args: argparse.Namespace) -> tuple[str, list[str]]:
    header = ["px", "masks", "batch", "workers", "n", "wall s (command)", "CPU s (command)", "stage s",
              "images/s (stage)", "images/s (command)", "sample s", "label s", "translate s", "write s", "rejected",
              "load before / after"]
    rows, commands = [], []
    combos = [(size, tr, b, w, args.n) for size in args.sizes for tr in args.translators for b in args.batch_sizes
              for w in args.workers]
    if args.big_n:
        combos.append((args.big_size, args.translators[0], args.big_batch, args.big_workers, args.big_n))
    for k, (size, tr, b, w, n) in enumerate(combos):
        repeats = 1 if (args.big_n and k == len(combos) - 1) else args.repeats
        results = []
        la = loadavg()
        for r in range(repeats):
            metrics, wall, cpu, cmd = generate_once(models_by_size[size], size, tr, b, w, n, args,
                                                    f"g{size}-{tr}-b{b}-w{w}-n{n}-r{r}")
            results.append((metrics, wall, cpu))
        commands.append(shown(cmd))
        results.sort(key=lambda mw: mw[0]["seconds"])
        metrics, wall, cpu = results[len(results) // 2]  # the median run by stage time (its parts belong together)
        tm = metrics["timings"]
        wall_med = statistics.median(r[1] for r in results)
        rows.append([size, "none" if tr == "none" else tr, b, w, n, f"{wall_med:.1f}",
                     f"{cpu:.1f}" + (" (+Ray workers)" if w > 1 else ""), f"{metrics['seconds']:.1f}",
                     f"{n / metrics['seconds']:.1f}", f"{n / wall_med:.1f}",
                     *(f"{tm[p]:.1f}" for p in PARTS), metrics["rejected"], f"{la} / {loadavg()}"])
        print(table([rows[-1]], header).splitlines()[-1], flush=True)
    text = (f"augment generate, {args.device}, OMP_NUM_THREADS {args.threads or 'unset'}, classes {args.classes}, threshold {args.threshold}, shard_size "
            f"{args.shard_size or 'default (256)'}; median of "
            f"{args.repeats} run(s) per row (the --big-n row: 1 run). 'stage s' is the stage's own seconds (pool "
            "start-up to finalize); the part columns are the stage's timings summed over shards.\n\n"
            + table(rows, header))
    return text, commands


# ------------------------------------------------------------------------------------------- parts
def sample_images(size: int, n: int) -> np.ndarray:
    """Real chest X-rays (the shared set) resized to ``size``, or smooth noise when it is missing."""
    from PIL import Image

    root = REPO.parent / "shared" / "data" / "cxr-real" / "images" / "kermany_pneumonia"
    files = sorted(root.glob("**/*.png"))[:n]
    if len(files) >= n:
        out = []
        for f in files:
            with Image.open(f) as im:
                out.append(np.asarray(im.convert("L").resize((size, size), Image.LANCZOS)))
        return np.stack(out)
    rng = np.random.default_rng(0)
    low = rng.uniform(0, 255, size=(n, 8, 8)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(a.astype(np.uint8)).resize((size, size), Image.BILINEAR)) for a in low])


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(fn, repeats: int, per: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds per item: medians over ``repeats`` calls of ``fn()``, divided by ``per``.

    The parts are single-threaded numpy / PIL / scipy work, so this process's CPU time is close to
    what one unshared core would take; the wall time includes waiting for a core on a loaded machine."""
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = _clock()
        fn()
        w1, c1 = _clock()
        walls.append((w1 - w0) / per)
        cpus.append((c1 - c0) / per)
    return statistics.median(walls), statistics.median(cpus)


def bench_parts(args: argparse.Namespace) -> str:
    from PIL import Image
    from scipy import ndimage

    from augment.jobs.shards import stream_id
    from cxrbase import write_png
    from generators.masks import diff_to_mask
    from generators.train import derive_seed

    n = 64 if args.quick else 512
    reps = 1 if args.quick else 5
    rows = []
    la = loadavg()
    sid, z_dim = stream_id("Edema"), 128
    idx = list(range(n))
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parts are per-row Python work; one thread keeps CPU time = work

    def row(name: str, px: object, wc: tuple[float, float], note: str = "") -> None:
        wall, cpu = wc
        rows.append([name, px, f"{wall * 1e6:,.1f}", f"{cpu * 1e6:,.1f}", f"{1 / cpu:,.0f}" if cpu > 0 else "-", note])
        print(table([rows[-1]], ["x"] * 6).splitlines()[-1], flush=True)

    per_sample = lambda: torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(  # noqa: E731
        derive_seed(0, sid, i))) for i in idx])
    row("noise z (128-d): derive_seed + torch.Generator + randn per row (as the stage)", "-", measure(per_sample, reps, n))
    row("  of which derive_seed (numpy SeedSequence)", "-",
        measure(lambda: [derive_seed(0, sid, i) for i in idx], reps, n))
    row("noise z (128-d): one batched randn", "-",
        measure(lambda: torch.randn(n, z_dim, generator=torch.Generator().manual_seed(0)), reps, n))
    tmp = Path(tempfile.mkdtemp(prefix="bench_gen_png_", dir=args.workdir))
    try:
        for size in args.sizes:
            imgs = list(sample_images(size, 64 if args.quick else 256))
            rng = np.random.default_rng(0)
            masks = [(ndimage.gaussian_filter(rng.normal(size=(size, size)), size / 16) > 0.02).astype(np.uint8) * 255
                     for _ in range(len(imgs))]
            counter = iter(range(10**9))

            def write_all(arrays: list[np.ndarray]) -> None:
                for a in arrays:
                    write_png(tmp / f"{next(counter)}.png", a)

            def encode_all(arrays: list[np.ndarray], level: int) -> None:
                for a in arrays:
                    Image.fromarray(a).save(io.BytesIO(), format="PNG", optimize=False, compress_level=level)

            kib6 = np.mean([len(_png_bytes(a, 6)) for a in imgs[:32]]) / 1024
            kib1 = np.mean([len(_png_bytes(a, 1)) for a in imgs[:32]]) / 1024
            row("PNG image: stage write_png (PIL level 6, file in /tmp)", size, measure(lambda: write_all(imgs), reps, len(imgs)),
                f"{kib6:.1f} KiB/image")
            row("PNG image: encode only, level 6", size, measure(lambda: encode_all(imgs, 6), reps, len(imgs)))
            row("PNG image: encode only, level 1", size, measure(lambda: encode_all(imgs, 1), reps, len(imgs)),
                f"{kib1:.1f} KiB/image")
            row("PNG mask (0/255): stage write_png", size, measure(lambda: write_all(masks), reps, len(masks)))
            b = 16 if args.quick else 64
            g = torch.Generator().manual_seed(0)
            yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            blob = torch.exp(-((yy - size / 2) ** 2 + (xx - size / 3) ** 2) / (2 * (size / 8) ** 2))
            diff = 0.05 * torch.randn(b, 1, size, size, generator=g) + 0.5 * blob  # an opacity on noise
            row(f"diff_to_mask (otsu, smooth_sigma 1, min_area 4) on a batch of {b}", size,
                measure(lambda: diff_to_mask(diff, finding="Edema", rule="otsu", min_area=4, smooth_sigma=1.0), reps, b),
                "per image and finding; a Python loop over images (numpy/scipy)")
            x = torch.rand(b, size, size)
            row(f"per-row access in the write loop (keep[j], labels[j].tolist(), probs[j].tolist(), "
                f"mask[j].cpu().numpy()), CPU tensors", size,
                measure(lambda: [(bool(x[j, 0, 0] > 0), x[j, :2, 0].tolist(), x[j, :2, 1].tolist(),
                                  (x[j].cpu().numpy() > 0.5)) for j in range(b)], reps, b),
                "on CUDA each of these is a device sync + copy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        torch.set_num_threads(prev_threads)
    header = ["part", "px", "wall us/image (median)", "CPU us/image (median)", "images/s per core (CPU)", "note"]
    return (f"Per-image parts of ShardWorker.run, one thread, median of {reps} repeats (load {la} / {loadavg()}); "
            "CPU = this process's CPU time, close to an unshared core\n\n" + table(rows, header))


def _png_bytes(a: np.ndarray, level: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", optimize=False, compress_level=level)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run: 32 px, narrow nets, n 40")
    p.add_argument("--device", default="cpu", help="cpu | cuda (training, labelling and generation)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_generate")
    p.add_argument("--models", nargs="*", default=[], metavar="PX=DIR", help="existing train runs per size (skip training)")
    p.add_argument("--labeller", default="resnet50", help="classifier config of the CGAN's pseudo-labeller when training")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--classes", default="edema,hernia")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--threshold", type=float, default=0.05)
    p.add_argument("--translators", nargs="+", default=["fixed_point", "none"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=0, help="generate.shard_size (0 = the config's, 256); a shard "
                   "is computed whole, so each class costs at least one shard of samples whatever --n is")
    p.add_argument("--big-n", type=int, default=0, help="one extra run with this --n (e.g. 10000), with masks")
    p.add_argument("--big-size", type=int, default=64)
    p.add_argument("--big-batch", type=int, default=64)
    p.add_argument("--big-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the augment commands (0 = unset: "
                   "torch's default, one per core; Ray workers get their own setting from Ray)")
    p.add_argument("--no-runs", action="store_true", help="only the per-part micro-benchmarks")
    p.add_argument("--no-parts", action="store_true", help="skip the per-part micro-benchmarks")
    p.add_argument("--keep", action="store_true", help="keep the generated folders")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.n, args.batch_sizes, args.workers = [32], 40, [16], [1]
        args.translators, args.shard_size = ["fixed_point"], 32
        args.train_steps, args.train_batch, args.labeller, args.repeats = 2, 8, "tiny", 1
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
        args.big_n = 0
    if args.threads:
        ENV["OMP_NUM_THREADS"] = str(args.threads)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"# bench_generate: {machine()}\n# command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}"
          f"\n# load average (1, 5, 15 min) at start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}",
          flush=True)
    out = []
    if not args.no_runs:
        given = {int(k): Path(v).resolve() for k, v in (m.split("=", 1) for m in args.models)}
        models_by_size, notes = {}, []
        sizes = sorted(set(args.sizes) | ({args.big_size} if args.big_n else set()))
        for size in sizes:
            if size in given:
                models_by_size[size] = given[size]
                notes.append(f"- {size} px: {given[size]} (given): {describe_models(given[size])}")
                continue
            la = loadavg()
            models, cmd, seconds = train_models(size, args)
            models_by_size[size] = models
            notes.append(f"- {size} px: `{cmd}` ({seconds:.0f} s, load {la} / {loadavg()}): {describe_models(models)}")
            print(notes[-1], flush=True)
        text, commands = bench_runs(models_by_size, args)
        out.append("Models:\n" + "\n".join(notes) + "\n\n" + text + "\n\nCommands (one per row):\n"
                   + "\n".join(f"    {c}" for c in dict.fromkeys(commands)))
    if not args.no_parts:
        out.append(bench_parts(args))
    print("\n" + "\n\n".join(out))
    print(f"\n# load average (1, 5, 15 min) at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
