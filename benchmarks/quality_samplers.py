"""Sampler quality figures of step 3 (docs/results.md): UCGAN's Table-5 ablation and CGAN class fidelity.

Two parts, each optional:

1. ``--ablation``: XRAY-GAN Table 5 on the phantom. For every variant (``simple``: adversarial +
   classification + pseudo-label losses only; ``is``: + the IS loss; ``is_mmd``: + MMD; ``full``:
   + IS + MMD + Gram/style) and every ``--seeds`` seed, ``augment train generator=ucgan`` with the
   variant's switches (``generator.use_is / use_mmd / use_style``) on the experiment's data
   (default ``experiment=quickstart``: 64 px, 30 real positives per class), then on the model:

   * the downstream AUC of UCGAN's classifier C on the real **test** split (per class and mean;
     C's softmax column of the class as its score), the paper's Table-5 measure;
   * the pseudo-label acceptance rate at t (``generator.threshold``, default 0.75): of ``--samples``
     draws of G, the share whose largest finding probability under C reaches t, and per class the
     share with p(class) >= t.

2. ``--cgan DIR --judge CKPT``: class fidelity of a trained CGAN (``DIR/models/cgan/checkpoint.pt``):
   ``--samples`` draws per class conditioned on that class, scored by an independently trained
   classifier checkpoint (e.g. a real-only baseline ``baseline/seed0/best.pt``): the share with
   p(conditioned class) >= 0.5 and the share where the conditioned class has the highest p; beside
   them the same shares on the real test positives of the class (the judge's own floor).

Usage::

    python benchmarks/quality_samplers.py --ablation --seeds 0 1 --steps 400 --out runs/results/ucgan_ablation
    python benchmarks/quality_samplers.py --cgan runs/run/quickstart/train \
        --judge runs/run/quickstart/baseline/seed0/best.pt --out runs/results/cgan_fidelity
    python benchmarks/quality_samplers.py --ablation --quick --out /tmp/qs   # seconds-long sanity run

Writes ``results.json`` and ``results.md`` to ``--out``; a rerun skips trained variants.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment.cli import main as augment_main  # noqa: E402
from augment.config import compose  # noqa: E402
from augment.data.sources import load_table  # noqa: E402
from augment.common import markdown_table, resolve_classes  # noqa: E402
from augment.jobs.gan import training_rows  # noqa: E402
from augment.models import load_model  # noqa: E402
from cxrbase import to_x  # noqa: E402
from classifiers.evaluate import evaluate  # noqa: E402
from classifiers.model import load_classifier  # noqa: E402

VARIANTS = {  # name -> (use_is, use_mmd, use_style)
    "simple": (False, False, False),
    "is": (True, False, False),
    "is_mmd": (True, True, False),
    "full": (True, True, True),
}


def _x(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W -> N x 1 x H x W in [-1, 1], as every model here was trained."""
    return to_x(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), "cpu")


@torch.no_grad()
def _batched(fn, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)]).float().cpu().numpy()


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def ablation(args: argparse.Namespace, out: Path) -> dict:
    base = [f"experiment={args.experiment}", "runtime=inline", "progress=false", f"train.max_steps={args.steps}",
            "train.sample_every=null", f"train.ckpt_every={max(args.steps, 1)}", *args.override]
    cfg = compose(base)
    table = load_table(cfg.data, show_progress=False)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    test = training_rows(table, classes, "test")
    labels = np.stack([table.column(c)[test] for c in classes], 1)
    x_test = _x(table.images[test])
    results: dict = {"experiment": args.experiment, "steps": args.steps, "classes": classes,
                     "n_test": int(len(test)), "image_size": table.image_size, "variants": {}}
    for name in args.variants:
        use_is, use_mmd, use_style = VARIANTS[name]
        runs = []
        for seed in args.seeds:
            folder = out / f"{name}-seed{seed}"
            ckpt = folder / "models" / "ucgan" / "checkpoint.pt"
            seconds = None  # a rerun skips a trained variant
            if not ckpt.is_file():
                t0 = time.perf_counter()
                argv = ["train", *base, "generator=ucgan", f"seed={seed}", f"generator.use_is={use_is}",
                        f"generator.use_mmd={use_mmd}", f"generator.use_style={use_style}", "--out", str(folder)]
                print("augment " + " ".join(argv), flush=True)
                if augment_main(argv) != 0:
                    raise SystemExit(f"training {name} seed {seed} failed")
                seconds = time.perf_counter() - t0
            system, ck = load_model(ckpt)
            c_classes = list(ck["classes"])
            cols = [c_classes.index(c) for c in classes]
            probs = _batched(system.classify, x_test)[:, cols]
            ev = evaluate(probs, labels, classes)
            t = float(system.threshold) if args.threshold is None else args.threshold
            g = torch.Generator().manual_seed(1000 + seed)
            fake = torch.cat([system.sample(min(128, args.samples - i), generator=g) for i in range(0, args.samples, 128)])
            p_fake = _batched(system.classify, fake)[:, cols]
            runs.append({"seed": seed, "auc": ev["auc"], "mean_auc": ev["mean_auc"], "threshold": t,
                         "acceptance": float((p_fake.max(1) >= t).mean()),
                         "acceptance_per_class": {c: float((p_fake[:, j] >= t).mean()) for j, c in enumerate(classes)},
                         "train_seconds": seconds})
            print(f"{name} seed {seed}: C test mean AUC {_fmt(ev['mean_auc'])}, acceptance at t={t}: "
                  f"{runs[-1]['acceptance']:.3f}", flush=True)
        results["variants"][name] = runs
    return results


def ablation_table(res: dict) -> str:
    classes = res["classes"]
    rows = []
    for name, runs in res["variants"].items():
        def ms(vals):
            vals = [v for v in vals if v is not None]
            if not vals:
                return "-"
            return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"
        rows.append([name, *[ms([r["auc"][c] for r in runs]) for c in classes], ms([r["mean_auc"] for r in runs]),
                     ms([r["acceptance"] for r in runs]),
                     ", ".join(_fmt(r["mean_auc"]) for r in runs)])
    return markdown_table(rows, ["variant", *[f"{c} AUC" for c in classes], "mean AUC", f"acceptance at t", "mean AUC per seed"])


@torch.no_grad()
def fidelity(args: argparse.Namespace, out: Path) -> dict:
    sampler, ck = load_model(Path(args.cgan) / "models" / "cgan" / "checkpoint.pt")
    s_classes = list(ck["classes"])
    judge, meta = load_classifier(args.judge)  # in eval mode
    j_classes = list(meta["classes"])
    classes = [c for c in s_classes if c in j_classes]
    cols = [j_classes.index(c) for c in classes]
    cfg = compose([f"experiment={args.experiment}", *args.override])
    table = load_table(cfg.data, show_progress=False)
    test = table.indices("test")
    per_class = {}
    for c in classes:
        g = torch.Generator().manual_seed(7 + s_classes.index(c))
        y = torch.zeros(args.samples, len(s_classes))
        y[:, s_classes.index(c)] = 1
        z = torch.randn(args.samples, sampler.z_dim, generator=g)
        fake = torch.cat([sampler.G(z[i:i + 128], y[i:i + 128]) for i in range(0, args.samples, 128)])
        p = torch.sigmoid(torch.from_numpy(_batched(judge, fake))).numpy()[:, cols]
        k = classes.index(c)
        pos = test[table.column(c)[test] == 1]
        p_real = torch.sigmoid(torch.from_numpy(_batched(judge, _x(table.images[pos])))).numpy()[:, cols]
        per_class[c] = {"n": args.samples, "p_ge_05": float((p[:, k] >= 0.5).mean()),
                        "argmax": float((p.argmax(1) == k).mean()), "mean_p": float(p[:, k].mean()),
                        "real_n": int(len(pos)), "real_p_ge_05": float((p_real[:, k] >= 0.5).mean()),
                        "real_argmax": float((p_real.argmax(1) == k).mean())}
    return {"cgan": str(args.cgan), "judge": str(args.judge), "classes": classes, "per_class": per_class}


def fidelity_table(res: dict) -> str:
    rows = [[c, r["n"], _fmt(r["p_ge_05"]), _fmt(r["argmax"]), _fmt(r["mean_p"]), r["real_n"], _fmt(r["real_p_ge_05"]),
             _fmt(r["real_argmax"])] for c, r in res["per_class"].items()]
    return markdown_table(rows, ["conditioned class", "samples", "p >= 0.5", "argmax", "mean p", "real test positives",
                                 "real p >= 0.5", "real argmax"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ablation", action="store_true", help="train the UCGAN variants and score their C")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--threshold", type=float, default=None, help="acceptance threshold t (default generator.threshold)")
    p.add_argument("--samples", type=int, default=512, help="G draws (per class for --cgan)")
    p.add_argument("--experiment", default="quickstart")
    p.add_argument("--cgan", default=None, help="a train run folder with models/cgan (class fidelity)")
    p.add_argument("--judge", default=None, help="an independently trained classifier checkpoint")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for training and data")
    p.add_argument("--quick", action="store_true", help="seconds-long sanity run (smoke experiment, 3 steps)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.quick:
        args.experiment, args.steps, args.samples = "smoke", 3, 32
    if not args.ablation and not args.cgan:
        p.error("pass --ablation and/or --cgan DIR --judge CKPT")
    if args.cgan and not args.judge:
        p.error("--cgan needs --judge CKPT (an independently trained classifier)")
    args.out.mkdir(parents=True, exist_ok=True)
    res, md = {}, []
    if args.ablation:
        res["ablation"] = ablation(args, args.out)
        md.append(f"UCGAN ablation ({res['ablation']['experiment']}, {res['ablation']['steps']} steps, "
                  f"{res['ablation']['image_size']} px, C scored on {res['ablation']['n_test']} test images)\n\n"
                  + ablation_table(res["ablation"]))
    if args.cgan:
        res["fidelity"] = fidelity(args, args.out)
        md.append("CGAN class fidelity (judge: " + str(args.judge) + ")\n\n" + fidelity_table(res["fidelity"]))
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    (args.out / "results.md").write_text("\n\n".join(md) + "\n")
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
