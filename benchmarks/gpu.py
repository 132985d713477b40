"""The device script: everything a GPU session should measure, in one command, inside one time budget.

Sections, in order (each one timed; one that fails is recorded with its error and the rest still run):

1. ``env``         torch / CUDA / GPU model, CPU count, which optional packages are importable (Ray, optuna).
2. ``tests``       ``pytest -m gpu``: the CUDA branches (bf16 autocast, channels-last, device placement of every
                   stage, a checkpoint written on the GPU and loaded on the CPU and back, Ray actors asking for GPUs).
3. ``classifier``  ResNet-50 train and inference images/s at 64 and 128 px (bf16 autocast + channels-last on CUDA).
4. ``gans``        training steps/s of every family (cgan, ucgan, fixed_point, taggan, branched) at 64 and 128 px.
5. ``fid``         feature extraction images/s (the domain extractor; Inception when its weights file is present).
6. ``generate``    ``augment generate`` images/s with masks at 128 px (tiny models trained first, a few steps).
7. ``long``        the rest of the budget: the default sampler recipe (cgan + its pseudo-labeller) trained at 128 px
                   on Kermany, then 512 samples, their domain FID/KID against the real split, and a sample grid.

Everything lands in one folder: ``gpu.json`` (all figures), ``gpu.md`` (the tables for docs/benchmarks.md),
``samples.png`` (the long run's grid), ``pytest.log``. Nothing needs the network. ``--tiny`` runs every section at
32 px with a few steps on whatever device there is (the CPU in CI) in well under a minute, so the script cannot rot.

Usage::

    python benchmarks/gpu.py --tiny --out /tmp/gpu-tiny                 # CPU sanity run (CI runs this)
    bash benchmarks/gpu.sh                                              # on the device machine (see that file)
    python benchmarks/gpu.py --out runs/gpu --budget 540 --data-root ../shared/data/cxr-real
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from augment.common import markdown_table as table  # noqa: E402

FAMILIES = [("generator", "cgan"), ("generator", "ucgan"), ("translator", "fixed_point"),
            ("translator", "taggan"), ("translator", "branched")]
CLASSES = ["Edema", "Hernia", "Effusion"]


# ----------------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(step: Callable[[], object], device: torch.device, per_step: int, warmup: int, steps: int) -> dict:
    """Median rate of ``step`` (items/s with ``per_step`` items a call) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"per_second": per_step / med, "seconds_per_step": med, "steps": steps}


def amp_ctx(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def cli(*args: str) -> int:
    """``augment`` in this process (runtime=inline: Ray is optional on the device machine)."""
    from augment.cli import main

    return main([*args])


class Plan:
    """Settings of a full or a ``--tiny`` run."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.sizes = [32] if tiny else [64, 128]
        self.gen_size = 32 if tiny else 128
        self.classifier = "tiny" if tiny else "resnet50"
        self.cls_batch, self.infer_batch = (4, 8) if tiny else (128, 512)
        self.gan_batch = 4 if tiny else 64
        self.warmup, self.steps = (1, 2) if tiny else (5, 20)
        self.gen_n, self.gen_batch = (6, 4) if tiny else (8192, 512)
        self.fid_n, self.fid_batch = (16, 8) if tiny else (8192, 512)
        self.long_samples = 12 if tiny else 512
        self.shard = 8 if tiny else 1024  # samples per shard: every candidate of a shard is labelled and translated


# ---------------------------------------------------------------------------------------------- sections
def sec_env(args, plan, device, out) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "cpus": os.cpu_count(), "python": platform.python_version(), "tiny": plan.tiny,
            "packages": {m: importlib.util.find_spec(m) is not None for m in ("ray", "optuna", "hydra", "timm", "pytorch_fid")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    return info


def sec_tests(args, plan, device, out) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, args.tests_timeout))
    (out / "pytest.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary, "counts": counts,
            "seconds": time.perf_counter() - t0}


def sec_classifier(args, plan, device, out) -> dict:
    from classifiers.model import create_classifier
    from classifiers.train import masked_bce_with_logits

    rows = {}
    cuda = device.type == "cuda"
    for size in plan.sizes:
        torch.manual_seed(0)
        model = create_classifier(plan.classifier, num_classes=len(CLASSES), in_chans=1).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if cuda else torch.contiguous_format
        x = (torch.rand(plan.cls_batch, 1, size, size, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
        y = (torch.rand(plan.cls_batch, len(CLASSES), generator=g) > 0.7).float().to(device)
        xi = (torch.rand(plan.infer_batch, 1, size, size, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)

        def train_step() -> None:
            with amp_ctx(device):
                loss = masked_bce_with_logits(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def infer_step() -> None:
            with torch.no_grad(), amp_ctx(device):
                model(xi)

        model.train()
        train = timed_rate(train_step, device, plan.cls_batch, plan.warmup, plan.steps)
        model.eval()
        infer = timed_rate(infer_step, device, plan.infer_batch, plan.warmup, plan.steps)
        rows[str(size)] = {"model": plan.classifier, "train_images_per_s": train["per_second"],
                           "infer_images_per_s": infer["per_second"], "train_batch": plan.cls_batch,
                           "infer_batch": plan.infer_batch}
        del model, opt
    return rows


def sec_gans(args, plan, device, out) -> dict:
    from augment.config import build, compose, to_dict
    from augment.models import model_config

    rows: dict[str, dict] = {}
    for size in plan.sizes:
        for group, family in FAMILIES:
            overrides = [f"{group}={family}", f"data.image_size={size}"]
            if plan.tiny:
                overrides += ["experiment=smoke"]
            cfg = compose(overrides)
            mcfg = model_config(to_dict(cfg[group]), CLASSES)
            k = len(mcfg["classes"])  # UCGAN's classifier adds No Finding
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                system = build(mcfg).to(device).train()
            opts = system.configure_optimizers()
            g = torch.Generator().manual_seed(0)
            x = (torch.rand(plan.gan_batch, 1, size, size, generator=g) * 2 - 1).to(device)
            y = (torch.rand(plan.gan_batch, k, generator=g) > 0.6).float()
            y[torch.arange(plan.gan_batch), torch.randint(0, k, (plan.gan_batch,), generator=g)] = 1.0
            batch = {"x": x, "y": y.to(device)}
            state = {"s": 0}

            def step() -> None:
                gen = torch.Generator(device=device).manual_seed(1000 + state["s"])
                with amp_ctx(device):
                    system.training_step(batch, opts, step=state["s"], generator=gen)
                state["s"] += 1

            r = timed_rate(step, device, 1, plan.warmup, plan.steps)
            rows[f"{family}@{size}"] = {"family": family, "size": size, "batch": plan.gan_batch,
                                        "steps_per_s": r["per_second"], "images_per_s": r["per_second"] * plan.gan_batch}
            del system, opts
    return rows


def sec_fid(args, plan, device, out) -> dict:
    from augment.metrics import fid as F
    from classifiers.model import create_classifier

    rows = {}
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (plan.fid_n, 1, plan.gen_size, plan.gen_size), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    extractors = {"domain": F.DomainExtractor(create_classifier(plan.classifier, num_classes=2, in_chans=1), sha256=None)}
    weights = F.default_inception_weights_path()
    if weights.is_file():
        extractors["inception"] = F.InceptionExtractor(weights)
    for name, ext in extractors.items():
        ext.to(device)
        F.features(ext, images[: plan.fid_batch], batch_size=plan.fid_batch)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        feats = F.features(ext, images, batch_size=plan.fid_batch)
        sync(device)
        rows[name] = {"images_per_s": plan.fid_n / (time.perf_counter() - t0), "n": plan.fid_n,
                      "size": plan.gen_size, "dims": int(feats.shape[1])}
    if "inception" not in extractors:
        rows["inception"] = {"skipped": f"no Inception weights at {weights}"}
    return rows


def _train_tiny(out: Path, size: int, steps: int, extra: list[str]) -> Path:
    run = out / "work" / f"models-{size}"
    code = cli("train", "experiment=smoke", "runtime=inline", "progress=false", f"data.image_size={size}",
               "generator=cgan", "translator=fixed_point", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
               "train.sample_every=null", "classify.epochs=1", f"train.device={DEVICE}", f"classify.device={DEVICE}",
               *extra, "--out", str(run))
    if code != 0:
        raise RuntimeError(f"augment train exited {code}")
    return run


def sec_generate(args, plan, device, out) -> dict:
    size = plan.gen_size
    models = _train_tiny(out, size, 4 if plan.tiny else 50, ["data.n=240"] if plan.tiny else ["data.n=2000"])
    dest = out / "work" / f"generate-{size}"
    t0 = time.perf_counter()
    code = cli("generate", "experiment=smoke", "runtime=inline", "progress=false", f"data.image_size={size}",
               "--models", str(models), "--n", str(plan.gen_n), "--batch-size", str(plan.gen_batch),
               "--threshold", "0.0001", "--translator", "fixed_point", "--allow-short", f"generate.device={DEVICE}",
               "generate.max_factor=200", f"generate.shard_size={plan.shard}", "--out", str(dest))
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"augment generate exited {code}")
    m = json.loads((dest / "metrics.json").read_text())
    return {"size": size, "n": m["n"], "images_per_s": m["images_per_second"], "wall_seconds": wall,
            "timings": m["timings"], "batch_size": plan.gen_batch}


def sec_long(args, plan, device, out, remaining: float) -> dict:
    """The default sampler recipe trained for the rest of the budget, then sampled and scored."""
    root = Path(args.data_root) if args.data_root else None
    if plan.tiny or root is None or not (root / "images" / "kermany_pneumonia").is_dir():
        data = ["experiment=smoke", "data.n=240", f"data.image_size={plan.gen_size}"]
        where = "phantom (smoke)"
    else:
        data = ["experiment=kermany", f"data.root={root.resolve()}", "data.image_size=128"]
        where = f"Kermany pneumonia at {root}"
    # steps/s of the cgan at this size from the gans section; half the remaining time trains, the rest samples/scores
    rate = args.cgan_rate or 1.0
    seconds = max(5.0, 0.55 * remaining)
    steps = max(4, int(rate * seconds)) if not plan.tiny else 4
    run = out / "work" / "long"
    t0 = time.perf_counter()
    code = cli("train", *data, "runtime=inline", "progress=false", "generator=cgan", f"train.max_steps={steps}",
               f"train.ckpt_every={max(1, steps // 4)}", "train.sample_every=null", f"train.device={DEVICE}",
               f"classify.device={DEVICE}", *(["classify.epochs=1"] if plan.tiny else ["classify.epochs=5"]),
               "--out", str(run))
    if code != 0:
        raise RuntimeError(f"augment train exited {code}")
    train_s = time.perf_counter() - t0
    syn = out / "work" / "long-samples"
    code = cli("generate", *data, "runtime=inline", "progress=false", "--models", str(run), "--n", str(plan.long_samples),
               "--translator", "none", "--threshold", "0.0001", "--allow-short", "generate.max_factor=200",
               f"generate.device={DEVICE}", f"generate.shard_size={plan.shard}", "--out", str(syn))
    if code != 0:
        raise RuntimeError(f"augment generate exited {code}")
    ev = out / "work" / "long-eval"
    code = cli("evaluate", *data, "runtime=inline", "progress=false", "--models", str(run), "--synthetic", str(syn),
               "--out", str(ev))
    result: dict = {"data": where, "steps": steps, "train_seconds": train_s, "samples": plan.long_samples}
    if code == 0:
        m = json.loads((ev / "metrics.json").read_text())
        result["image_metrics"] = {k: v for k, v in m.items() if isinstance(v, (int, float, dict)) and k != "command"}
    else:
        result["evaluate_exit"] = code
    _grid(sorted((syn / "images").glob("*.png"))[:64], out / "samples.png")
    return result


def _grid(files: list[Path], dest: Path) -> None:
    from PIL import Image

    if not files:
        return
    tiles = [np.asarray(Image.open(f).convert("L")) for f in files]
    s = tiles[0].shape[0]
    cols = min(8, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    grid = np.zeros((rows * s, cols * s), dtype=np.uint8)
    for i, t in enumerate(tiles):
        grid[(i // cols) * s:(i // cols + 1) * s, (i % cols) * s:(i % cols + 1) * s] = t
    Image.fromarray(grid).save(dest)


# ------------------------------------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    env = res["sections"].get("env", {}).get("result", {})
    lines = [f"# Device script ({'tiny' if res['tiny'] else 'full'})", "",
             f"Machine: {env.get('gpu', env.get('device'))}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"{env.get('cpus')} CPUs. Command: `{res['command']}`. Wall: {res['seconds']:.0f} s.", ""]
    secs = res["sections"]
    if "tests" in secs and "result" in secs["tests"]:
        t = secs["tests"]["result"]
        lines += ["## GPU tests", "", f"`{t['command']}`: {t['summary']} (exit {t['returncode']})", ""]
    if "classifier" in secs and "result" in secs["classifier"]:
        rows = [[k, v["model"], f"{v['train_images_per_s']:,.0f}", v["train_batch"], f"{v['infer_images_per_s']:,.0f}",
                 v["infer_batch"]] for k, v in secs["classifier"]["result"].items()]
        lines += ["## Classifier", "", table(rows, ["px", "model", "train images/s", "batch", "inference images/s", "batch"]), ""]
    if "gans" in secs and "result" in secs["gans"]:
        rows = [[v["family"], v["size"], v["batch"], f"{v['steps_per_s']:,.1f}", f"{v['images_per_s']:,.0f}"]
                for v in secs["gans"]["result"].values()]
        lines += ["## GAN training", "", table(rows, ["family", "px", "batch", "steps/s", "images/s"]), ""]
    if "fid" in secs and "result" in secs["fid"]:
        rows = [[k, v.get("size", ""), f"{v['images_per_s']:,.0f}" if "images_per_s" in v else v.get("skipped", "")]
                for k, v in secs["fid"]["result"].items()]
        lines += ["## FID features", "", table(rows, ["extractor", "px", "images/s"]), ""]
    if "generate" in secs and "result" in secs["generate"]:
        g = secs["generate"]["result"]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in g["timings"].items())
        lines += ["## augment generate (with fixed_point masks)", "",
                  f"{g['n']} images at {g['size']} px, batch {g['batch_size']}: **{g['images_per_s']:,.3g} images/s** ({parts})", ""]
    if "long" in secs and "result" in secs["long"]:
        lg = secs["long"]["result"]
        lines += ["## Long run", "", f"cgan on {lg['data']}: {lg['steps']} steps in {lg['train_seconds']:.0f} s; "
                  f"{lg['samples']} samples; metrics: `{json.dumps(lg.get('image_metrics', {}))[:800]}`", ""]
    errors = [f"- `{k}`: {v['error']}" for k, v in secs.items() if "error" in v]
    if errors:
        lines += ["## Errors", "", *errors, ""]
    return "\n".join(lines)


DEVICE = "cpu"


def main(argv: list[str] | None = None) -> int:
    global DEVICE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="32 px, a few steps, any device: a sanity run in seconds")
    p.add_argument("--out", default="runs/gpu", help="output folder (gpu.json, gpu.md, samples.png, pytest.log)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole script (default 9 minutes)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    p.add_argument("--data-root", default=None, help="a cxr-real folder holding images/kermany_pneumonia (the long run)")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip (env tests classifier gans fid generate long)")
    p.add_argument("--tests-timeout", type=float, default=180.0, help="seconds for the GPU tests")
    args = p.parse_args(argv)
    from cxrbase import resolve_device

    device = resolve_device(args.device)
    DEVICE = str(device)
    plan = Plan(args.tiny)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AUGMENT_CACHE_DIR", str((out / "work" / "cache").resolve()))
    cwd = os.getcwd()
    os.chdir(out)  # runs/train/latest and friends land in the output folder, not in the checkout
    out = Path(".")
    start = time.perf_counter()
    res: dict = {"tiny": plan.tiny, "command": " ".join(["python benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
                 "sections": {}}
    args.cgan_rate = None
    try:
        for name, fn in [("env", sec_env), ("tests", sec_tests), ("classifier", sec_classifier), ("gans", sec_gans),
                         ("fid", sec_fid), ("generate", sec_generate), ("long", sec_long)]:
            if name in args.skip:
                res["sections"][name] = {"skipped": "--skip"}
                continue
            remaining = args.budget - (time.perf_counter() - start)
            if remaining < (0 if plan.tiny else 20):
                res["sections"][name] = {"skipped": f"budget spent ({args.budget:g} s)"}
                continue
            print(f"gpu.py: {name} ({remaining:.0f} s left)", flush=True)
            t0 = time.perf_counter()
            try:
                result = fn(args, plan, device, out, remaining) if name == "long" else fn(args, plan, device, out)
                res["sections"][name] = {"result": result, "seconds": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' figures
                res["sections"][name] = {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0,
                                         "traceback": traceback.format_exc()[-4000:]}
                print(f"gpu.py: {name} failed: {type(exc).__name__}: {exc}", flush=True)
            if name == "gans" and "result" in res["sections"][name]:
                key = f"cgan@{plan.gen_size}"
                args.cgan_rate = res["sections"][name]["result"].get(key, {}).get("steps_per_s")
            res["seconds"] = time.perf_counter() - start
            Path("gpu.json").write_text(json.dumps(res, indent=2, default=str))  # after every section: a kill keeps them
    finally:
        res["seconds"] = time.perf_counter() - start
        Path("gpu.json").write_text(json.dumps(res, indent=2, default=str))
        Path("gpu.md").write_text(markdown(res))
        os.chdir(cwd)
    print(markdown(res))
    failed = [k for k, v in res["sections"].items() if "error" in v]
    tests = res["sections"].get("tests", {}).get("result", {})
    return 1 if failed or tests.get("returncode", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
