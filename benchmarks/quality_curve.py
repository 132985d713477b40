"""The low-data curve with its own generators: one `augment run` per point, then one table and figure.

`augment classify --curve` reuses one synthetic set at every point. The fair-evidence issue asks more:
at each point (real positives per class) the generators and the pseudo-labeller train on the same
limited positives as the classifiers. So each point here is a whole `augment run` (train -> baseline
-> generate -> arms -> evaluate -> report) with ``classify.limit_positives`` set for every class, in
``<out>/positives_<point>/``; a finished point is skipped (the run's own resume), so the command can be
stopped and started again. At the end the arms of every point are gathered into ``curve.md`` (one
summary table, then each point's arm table), ``curve.json`` and ``curve.png``.

    python benchmarks/quality_curve.py --out runs/curve/phantom --classes Edema,Hernia,Effusion \\
        --points 20,40,100,all --seeds 0,1,2,3,4 -- experiment=quickstart run.translator=null classify.steps=120
    python benchmarks/quality_curve.py --out runs/curve/phantom --classes ... --table-only   # gather only

Everything after ``--`` is passed to every `augment run` as overrides. ``--shift "OVERRIDES"`` also scores
each point's arm models on another data set (`augment classify --checkpoint <point>/augmented OVERRIDES`,
e.g. other sites), into ``shift_<point>/``, and adds the same summary for it: evidence that survives a shift.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from augment import arms as armlib  # noqa: E402
from augment.common import markdown_table  # noqa: E402


def point_override(point: str, classes: list[str]) -> str:
    if point == "all":
        return "classify.limit_positives={}"
    return "classify.limit_positives={" + ",".join(f"{c}:{int(point)}" for c in classes) + "}"


def run_point(out: Path, point: str, classes: list[str], seeds: list[int], overrides: list[str]) -> float:
    folder = out / f"positives_{point}"
    if (folder / "report" / "done.json").is_file() and (folder / "augmented" / "metrics.json").is_file():
        return 0.0
    cmd = [str(Path(sys.executable).with_name("augment")), "run", *overrides,
           f"classes=[{','.join(classes)}]", point_override(point, classes),
           f"classify.seeds=[{','.join(map(str, seeds))}]", "run.curve=[]", "progress=false", "--out", str(folder)]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def score_shift(out: Path, point: str, classes: list[str], shift: str) -> None:
    folder = out / f"shift_{point}"
    if (folder / "metrics.json").is_file() or not (out / f"positives_{point}" / "augmented" / "metrics.json").is_file():
        return
    cmd = [str(Path(sys.executable).with_name("augment")), "classify", "--checkpoint",
           str(out / f"positives_{point}" / "augmented"), *shlex.split(shift), f"classes=[{','.join(classes)}]",
           "progress=false", "--out", str(folder)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def gather_shift(out: Path, points: list[str], g: dict) -> dict:
    """The shifted scores in the shape ``summary_table`` reads (budgets and counts of the points)."""
    comparisons = {}
    n = {}
    for point in points:
        path = out / f"shift_{point}" / "metrics.json"
        if path.is_file() and point in g["comparisons"]:
            m = json.loads(path.read_text())
            if m.get("comparison"):
                comparisons[point] = m["comparison"]
                n[point] = m["n"]
    return {**g, "comparisons": comparisons, "scored": n}


def gather(out: Path, points: list[str], classes: list[str]) -> dict:
    comparisons, tables, budgets, counts, seconds = {}, {}, {}, {}, {}
    arms: list[str] = []
    for point in points:
        folder = out / f"positives_{point}"
        path = folder / "augmented" / "metrics.json"
        if not path.is_file():
            print(f"point {point}: not run yet ({path} missing)")
            continue
        m = json.loads(path.read_text())
        arms = list(m["arms"])
        comparisons[point] = m["comparison"]
        tables[point] = m["table"]
        budgets[point] = m["budget"]
        run_metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
        counts[point] = ((run_metrics.get("steps") or {}).get("generate") or {}).get("counts")
        seconds[point] = sum(v for k, v in (run_metrics.get("timings") or {}).items() if "earlier" not in k)
    return {"arms": arms, "comparisons": comparisons, "tables": tables, "budgets": budgets, "counts": counts,
            "seconds": seconds}


def summary_table(g: dict, classes: list[str]) -> str:
    rows = []
    for point, comp in g["comparisons"].items():
        cells = [point, str(g["budgets"][point]["n_real_train"]), str(g["budgets"][point]["steps"])]
        for a in g["arms"]:
            s = comp["arms"][a]["auc"]["mean_auc"]
            cells.append("undefined" if s["mean"] is None else f"{s['mean']:.3f} ± {s['sd']:.3f}")
        best = comp.get("best_control")
        diff = comp.get("synthetic_vs_best_control", {}).get("mean_auc")
        cells += [best or "-", armlib._ci(diff) if diff else "-"]
        counts = g["counts"].get(point) or {}
        cells.append(", ".join(f"{c} {counts.get(c, 0)}" for c in classes) if counts else "-")
        rows.append(cells)
    head = ["positives", "real train images", "steps", *g["arms"], "best control", "synthetic − best control",
            "synthetic images"]
    return markdown_table(rows, head)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--classes", required=True, help="comma-separated class names, as in the experiment")
    p.add_argument("--points", default="20,40,100,all")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--shift", default="", help="overrides of a second data set to score every point's arms on")
    a = p.parse_args(argv)
    classes = [c.strip() for c in a.classes.split(",") if c.strip()]
    points = [x.strip().lower() for x in a.points.split(",") if x.strip()]
    seeds = [int(s) for s in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        for point in points:
            took = run_point(a.out, point, classes, seeds, overrides)
            print(f"point {point}: {took:.0f} s", flush=True)
    if a.shift:
        for point in points:
            score_shift(a.out, point, classes, a.shift)
    g = gather(a.out, points, classes)
    if not g["comparisons"]:
        print("no finished point to gather")
        return 1
    text = ["Mean test AUC per arm (mean ± sd over seeds) and synthetic − best control (95 % t-interval; "
            "* = excludes 0):", "", summary_table(g, classes), ""]
    shifted = gather_shift(a.out, points, g)
    if shifted["comparisons"]:
        text += [f"The same models scored on the shifted set ({a.shift or 'see shift_*/config.yaml'}; "
                 f"{', '.join(f'{p}: {n} images' for p, n in shifted['scored'].items())}):", "",
                 summary_table(shifted, classes), ""]
        g["shift"] = {"overrides": a.shift, "comparisons": shifted["comparisons"], "scored": shifted["scored"]}
        armlib.curve_plot(shifted["comparisons"], g["arms"], classes, a.out / "curve_shift.png",
                          f"the same models on the shifted set ({a.out.name})")
    for point, tab in g["tables"].items():
        b = g["budgets"][point]
        text += [f"### {point} real positives per class", "",
                 f"{b['steps']} optimizer steps per arm and seed; batch {b['batch_size']} = {b['real_per_step']} real + "
                 f"{b['slot_per_step']} slot images; {b['n_real_train']} real training images; "
                 f"whole point {g['seconds'][point]:.0f} s", "", tab, ""]
    (a.out / "curve.md").write_text("\n".join(text))
    (a.out / "curve.json").write_text(json.dumps(g, indent=1, default=str))
    armlib.curve_plot(g["comparisons"], g["arms"], classes, a.out / "curve.png",
                      f"test AUC vs real positives per class ({a.out.name}; generators trained per point)")
    print("\n".join(text))
    print(f"wrote {a.out / 'curve.md'}, {a.out / 'curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
