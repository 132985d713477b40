"""One arm x seed unit of `augment classify --arms ...`: is the loader or the training step the bottleneck?

For each arm (real, classic, oversample, synthetic, synthetic+classic) at each size, on phantom data
and a synthetic set written in the synthetic format (phantom images, so nothing has to be trained):

- loader: images/s of the batches alone: ``MixedBatchSampler`` -> ``DataLoader`` -> collate, plus
  the classic augmentation on the uint8 batch for the classic arms (what the loop does before the
  model); no model.
- step: images/s of the training step alone (forward + masked BCE + backward + AdamW) on one
  prepared batch.
- unit: ``classifiers.train.train_classifier`` with ``max_steps`` (no validation), the whole loop:
  images/s and seconds per 1,000 steps.

Usage::

    python benchmarks/bench_arms.py                        # 64 px, resnet18, batch 64, 40 steps
    python benchmarks/bench_arms.py --sizes 64 128 --steps 100
    python benchmarks/bench_arms.py --device cuda --amp    # on a GPU
    python benchmarks/bench_arms.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment.arms import ARMS, SPEC  # noqa: E402
from augment.config import compose  # noqa: E402
from augment.data.mixing import MixedBatchSampler, MixedDataset  # noqa: E402
from augment.data.sources import load_table  # noqa: E402
from augment.data.synthetic import SyntheticDataset  # noqa: E402
from augment.data.table import XrayDataset  # noqa: E402
from augment.jobs.classifier import classic_augment, slot_share  # noqa: E402
from classifiers.model import create_classifier  # noqa: E402
from classifiers.train import masked_bce_with_logits, train_classifier  # noqa: E402
from cxrbase import collate, to_x  # noqa: E402
from benchmarks._machine import loadavg  # noqa: E402

CLASSES = ["Edema", "Hernia", "Effusion"]


def synthetic_set(root: Path, table, n: int) -> Path:
    """``n`` phantom images in the synthetic format (labels.csv with p_ columns, dataset.json)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    idx = table.indices("train")[:n]
    for k, i in enumerate(idx):
        Image.fromarray(np.asarray(table.images[i], np.uint8)).save(root / "images" / f"b{k:05d}.png")
        lab = [c for c in CLASSES if table.column(c)[i] == 1]
        rows.append({"Image Index": f"b{k:05d}.png", "Finding Labels": "|".join(lab) or "No Finding",
                     "file": f"images/b{k:05d}.png", "mask": "",
                     **{f"p_{c}": 0.9 if c in lab else 0.1 for c in CLASSES}, "generator": "bench", "seed": k})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    return root


def build(arm: str, cfg, table, syn_dir: Path, seed: int = 0):
    """The dataset and sampler train_arm builds for ``arm`` (``per_eval`` batches per pass)."""
    ccfg = cfg.classify
    train_idx = table.indices("train")
    train = XrayDataset(table, train_idx, CLASSES)
    batch, ratio = int(ccfg.batch_size), float(ccfg.ratio)
    k_real, k_slot = slot_share(batch, ratio)
    slot, classic = SPEC[arm]
    g, sg = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    if slot is None:
        return train, MixedBatchSampler(len(train), 0, batch_size=k_real, ratio=0.0, generator=g, num_batches=10**6), classic
    if slot == "synthetic":
        part, w = SyntheticDataset(syn_dir, classes=CLASSES, with_masks=False), None
    else:
        pos = np.zeros(len(train_idx), bool)
        for c in CLASSES:
            pos |= table.column(c)[train_idx] == 1
        part, w = XrayDataset(table, train_idx[pos], CLASSES), None
    ds = MixedDataset(train, part, xi=float(ccfg.xi))
    return ds, MixedBatchSampler(len(train), len(part), batch_size=batch, ratio=ratio, generator=g, num_batches=10**6,
                                 synthetic_weights=w, slot_generator=sg), classic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    ap.add_argument("--n", type=int, default=1200, help="phantom images")
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.steps, a.n, a.model = [32], 5, 300, "tiny"
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {a.device}; torch {torch.__version__}")
    print(f"command: python benchmarks/bench_arms.py {' '.join(sys.argv[1:])}\n")
    print("| size | arm | loader images/s | step images/s | unit images/s | s / 1000 steps | loader share of a step | load |")
    print("|---|---|---|---|---|---|---|---|")
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    for size in a.sizes:
        cfg = compose(["experiment=quickstart", f"data.image_size={size}", f"data.n={a.n}",
                       f"classify.batch_size={a.batch_size}"])
        table = load_table(cfg.data, show_progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            syn = synthetic_set(Path(tmp) / "syn", table, 300)
            for arm in a.arms:
                ds, sampler, classic = build(arm, cfg, table, syn)
                aug = classic_augment(cfg.classify) if classic else None
                gen = torch.Generator().manual_seed(0)
                loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
                it = iter(loader)
                next(it)
                t0, n_img = time.perf_counter(), 0
                for _ in range(a.steps):
                    b = next(it)
                    img = b["image"] if aug is None else aug(b["image"], gen)
                    n_img += len(img)
                loader_s = time.perf_counter() - t0
                batch = b
                model = create_classifier(a.model, num_classes=len(CLASSES), in_chans=1).to(device)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and a.amp else torch.autocast("cpu", enabled=False)

                def step() -> None:
                    x = to_x(batch["image"], device)
                    with ctx:
                        logits = model(x)
                    loss = masked_bce_with_logits(logits, batch["labels"].to(device), batch["weight"].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                for _ in range(3):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step()
                if cuda:
                    torch.cuda.synchronize()
                step_s = time.perf_counter() - t0
                model = create_classifier(a.model, num_classes=len(CLASSES), in_chans=1)
                ds, sampler, _ = build(arm, cfg, table, syn)
                sampler.num_batches = a.steps
                t0 = time.perf_counter()
                res = train_classifier(model, ds, None, epochs=1, batch_size=a.batch_size, device=device,
                                       max_steps=a.steps, sampler=sampler, augment=aug, progress=False, amp=a.amp)
                unit_s = time.perf_counter() - t0
                per_batch = n_img / a.steps
                print(f"| {size} | {arm} | {n_img / loader_s:,.0f} | {per_batch * a.steps / step_s:,.0f} | "
                      f"{res.images_per_second:,.0f} | {unit_s / res.steps * 1000:,.0f} | "
                      f"{loader_s / (loader_s + step_s):.0%} | {loadavg()} |", flush=True)


if __name__ == "__main__":
    main()
