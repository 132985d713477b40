"""Step-4 translator comparison: train, evaluate and tabulate the three mask-producing families.

Runs (each a plain `augment train` + `augment evaluate`, skipped when its evaluation exists) under
``--out``; then prints Markdown tables of mean +- sd over seeds for docs/results.md.

    python benchmarks/quality_translators.py --out runs/t5                 # everything below, in order
    python benchmarks/quality_translators.py --out runs/t5 --table-only    # tables from finished runs

What runs (phantom: experiment=quickstart, 64 px, the five findings, quickstart widths 16 / n_res 2,
batch 16; Kermany: experiment=kermany at 128 px, the same widths):

- ``main``: Fixed-Point GAN, TagGAN and Branched GAN (5 branches) for each ``--seeds``, each family with
  its own step budget (``--steps fixed_point=2400 taggan=1200 branched=300``: about equal CPU time);
- ``ablation`` (first seed): StarGAN (Fixed-Point GAN without the identity loss), TagGAN without the
  backward cycle, Branched with 1 and 2 branches;
- ``long`` (first seed): each family resumed to ``--long`` multiples of its budget;
- ``kermany``: each family on Kermany (pneumonia vs normal), evaluated on Kermany's test part and on
  the COVID-19 images with lung masks (lung containment).

Set ``OMP_NUM_THREADS=1`` and run two copies with different ``--parts`` to use two cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CLASSES = "edema,hernia,pneumonia,effusion,mass"
FAMILIES = ("fixed_point", "taggan", "branched")
LABEL = {"fixed_point": "Fixed-Point GAN", "taggan": "TagGAN", "branched": "Branched (5)"}
PHANTOM = ["experiment=quickstart", "--classes", CLASSES]
KERMANY = ["experiment=kermany", "translator.g_width=16", "translator.d_width=16", "train.translator_batch_size=16"]
EXTRA: list[str] = []  # --extra: more `augment train` overrides for every run (e.g. translator.g_width=64 on a GPU)
KEYS = [("dice_mean", "Dice"), ("iou_mean", "IoU"), ("poi_mean", "PoI"), ("detection_auc", "det. AUC"),
        ("sensitivity_at_1fp", "sens@1FP"), ("healing_psnr_mean", "PSNR dB"), ("identity_l1_mean", "identity L1"),
        ("lung_containment_mean", "in lungs")]


def augment(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("augment")), *args, "progress=false"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def phantom_run(out: Path, name: str, steps: int, overrides: list[str], resume_from: str | None = None) -> None:
    run = out / name
    if (run / "eval" / "metrics.json").is_file():
        return
    if resume_from and not (run / "train").exists():
        shutil.copytree(out / resume_from / "train", run / "train")
    t0 = time.perf_counter()
    augment("train", *PHANTOM, "runtime=inline", f"train.max_steps={steps}", "train.ckpt_every=100",
            "train.sample_every=100000", *EXTRA, *overrides, "--out", str(run / "train"))
    print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    augment("evaluate", *PHANTOM, "--models", str(run / "train"), "--out", str(run / "eval"))


def kermany_run(out: Path, family: str, steps: int) -> None:
    run = out / f"k_{family}"
    if (run / "eval_covid" / "metrics.json").is_file():
        return
    extra = ["translator.n_res=2"] if family != "branched" else []  # Branched's config has no n_res key
    augment("train", *KERMANY, *extra, f"translator={family}", "runtime=inline", f"train.max_steps={steps}",
            "train.ckpt_every=10", "train.sample_every=100000", *EXTRA, "--out", str(run / "train"))
    augment("evaluate", "experiment=kermany", "--models", str(run / "train"), "--out", str(run / "eval"))
    augment("evaluate", "experiment=kermany", "data.include=[images/covid_ieee8023/]", "--models", str(run / "train"),
            "--out", str(run / "eval_covid"))


# -- tables -------------------------------------------------------------------------------------------


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


@functools.lru_cache(maxsize=None)  # every table reads the same runs
def per_class(out: Path, name: str) -> tuple[dict, dict] | None:
    m = _load(out / name / "eval" / "metrics.json")
    if m is None or "masks" not in m:
        return None
    fam = next(iter(m["masks"].values()))
    return fam["per_class"], m.get("mask_reference", {}).get("per_class", {})


def phantom_tables(out: Path, seeds: list[int]) -> str:
    """Per finding: Dice, PoI, detection AUC and sensitivity at 1 FP, mean +- sd over seeds."""
    lines = []
    classes = [c.capitalize() for c in CLASSES.split(",")]
    ref = None
    for key, title in KEYS[:5]:
        if key == "iou_mean":
            continue
        rows = []
        for fam in FAMILIES:
            runs = [per_class(out, f"{fam}_s{s}") for s in seeds]
            runs = [r for r in runs if r is not None]
            if not runs:
                continue
            ref = ref or runs[0][1]
            rows.append(f"| {LABEL[fam]} ({len(runs)} seed{'s' if len(runs) > 1 else ''}) | " + " | ".join(
                _cell([r[0][c].get(key) for r in runs]) for c in classes) + " |")
        if ref:
            rows.append("| reference (true healthy render) | " + " | ".join(_cell([ref[c].get(key)]) for c in classes) + " |")
        if rows:
            lines += [f"**{title}**", "", "| family | " + " | ".join(classes) + " |",
                      "|---|" + "---|" * len(classes), *rows, ""]
    return "\n".join(lines)


def _finding_mean(pc: dict, key: str) -> float | None:
    v = [pc[c].get(key) for c in pc if pc[c].get(key) is not None]
    return statistics.fmean(v) if v else None


def summary_rows(out: Path, names: dict[str, list[str]]) -> str:
    """One row per label: each metric's mean over the five findings, then mean +- sd over its runs."""
    head = "| run | " + " | ".join(t for _, t in KEYS) + " |"
    rows = [head, "|---|" + "---|" * len(KEYS)]
    ref = None
    for label, run_names in names.items():
        runs = [r for r in (per_class(out, n) for n in run_names) if r is not None]
        if not runs:
            continue
        ref = ref or runs[0][1]
        n = f" ({len(runs)} seed{'s' if len(runs) > 1 else ''})" if len(run_names) > 1 else ""
        rows.append(f"| {label}{n} | " + " | ".join(_cell([_finding_mean(r[0], k) for r in runs]) for k, _ in KEYS) + " |")
    if ref:
        rows.append("| reference (true healthy render) | " + " | ".join(_cell([_finding_mean(ref, k)]) for k, _ in KEYS) + " |")
        unchanged = _finding_mean(ref, "unchanged_psnr_mean")
        if unchanged is not None:
            rows.append("| input left unchanged | - | - | - | 0.500 | - | " + f"{unchanged:.3f}" + " | 0.000 | - |")
    return "\n".join(rows)


def kermany_table(out: Path) -> str:
    rows = ["| family | steps | det. AUC (Kermany test) | identity L1 (Kermany normals) | det. AUC (COVID) | in lungs (COVID) | n lung-masked |",
            "|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        k = _load(out / f"k_{fam}" / "eval" / "metrics.json")
        c = _load(out / f"k_{fam}" / "eval_covid" / "metrics.json")
        t = _load(out / f"k_{fam}" / "train" / "metrics.json")
        if k is None or c is None:
            continue
        kp = next(iter(k["masks"].values()))["per_class"]["Pneumonia"]
        cp = next(iter(c["masks"].values()))["per_class"]["Pneumonia"]
        steps = next(iter((t or {}).get("models", {}).values()), {}).get("steps", "?") if t else "?"

        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        rows.append(f"| {LABEL[fam]} | {steps} | {f(kp.get('detection_auc'))} | {f(kp.get('identity_l1_mean'))} | "
                    f"{f(cp.get('detection_auc'))} | {f(cp.get('lung_containment_mean'))} | {cp.get('lung_containment_n', '-')} |")
    return "\n".join(rows)


def tables(out: Path, seeds: list[int], long: list[int], steps: dict[str, int]) -> str:
    s0 = seeds[0]
    main = {f"{LABEL[fam]}, {steps[fam]} steps": [f"{fam}_s{s}" for s in seeds] for fam in FAMILIES}
    ablation = {"Fixed-Point GAN": [f"fixed_point_s{s0}"], "StarGAN (no identity loss)": [f"stargan_s{s0}"],
                "TagGAN": [f"taggan_s{s0}"], "TagGAN without backward cycle": [f"taggan_noback_s{s0}"],
                "Branched, 5 branches": [f"branched_s{s0}"], "Branched, 2 branches": [f"branched2_s{s0}"],
                "Branched, 1 branch": [f"branched1_s{s0}"]}
    curve = {}
    for fam in FAMILIES:
        curve[f"{LABEL[fam]}, {steps[fam]} steps"] = [f"{fam}_s{s0}"]
        for k in long:
            curve[f"{LABEL[fam]}, {k * steps[fam]} steps"] = [f"{fam}_s{s0}_x{k}"]
    return "\n\n".join([
        "### Phantom 64 px, mean over the five findings (mean ± sd over seeds)", summary_rows(out, main),
        "### Phantom 64 px, per finding (mean ± sd over seeds)", phantom_tables(out, seeds),
        f"### Ablations (seed {s0}; mean over the five findings)", summary_rows(out, ablation),
        f"### Longer schedules (seed {s0}; mean over the five findings)", summary_rows(out, curve),
        "### Kermany 128 px", kermany_table(out)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/t5"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", nargs="+", default=["fixed_point=2400", "taggan=1200", "branched=300"])
    ap.add_argument("--kermany-steps", nargs="+", default=["fixed_point=600", "taggan=300", "branched=70"])
    ap.add_argument("--long", type=int, nargs="*", default=[2, 3], help="multiples of the step budget for `long`")
    ap.add_argument("--parts", nargs="+", default=["main", "ablation", "long", "kermany"],
                    choices=["main", "ablation", "long", "kermany"])
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="more `augment train` overrides for every run")
    a = ap.parse_args()
    EXTRA[:] = a.extra
    steps = {k: int(v) for k, v in (s.split("=") for s in a.steps)}
    ksteps = {k: int(v) for k, v in (s.split("=") for s in a.kermany_steps)}
    s0 = a.seeds[0]
    if not a.table_only:
        if "main" in a.parts:
            for s in a.seeds:
                for fam in FAMILIES:
                    phantom_run(a.out, f"{fam}_s{s}", steps[fam], [f"translator={fam}", f"seed={s}"])
        if "ablation" in a.parts:
            fp, tg, br = steps["fixed_point"], steps["taggan"], steps["branched"]
            phantom_run(a.out, f"stargan_s{s0}", fp, ["translator=fixed_point", "translator.use_identity=false", f"seed={s0}"])
            phantom_run(a.out, f"taggan_noback_s{s0}", tg, ["translator=taggan", "translator.use_backward_cycle=false", f"seed={s0}"])
            for n in (1, 2):
                phantom_run(a.out, f"branched{n}_s{s0}", br, ["translator=branched", f"translator.n_branches={n}", f"seed={s0}"])
        if "long" in a.parts:
            for fam in FAMILIES:
                prev = f"{fam}_s{s0}"
                for k in a.long:
                    name = f"{fam}_s{s0}_x{k}"
                    phantom_run(a.out, name, k * steps[fam], [f"translator={fam}", f"seed={s0}"], resume_from=prev)
                    prev = name
        if "kermany" in a.parts:
            for fam in FAMILIES:
                kermany_run(a.out, fam, ksteps[fam])
    print(tables(a.out, a.seeds, a.long, steps))


if __name__ == "__main__":
    main()
