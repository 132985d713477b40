"""The fair comparison: training arms at an equal step budget, paired over seeds.

Arms (``classify.arms``):

- ``real``: real images only.
- ``classic``: real images with classic augmentation (:class:`classifiers.classic.ClassicAugment`).
- ``oversample``: the synthetic slot of each batch (share r, loss weight xi) filled with repeated
  real positives of the generated classes.
- ``synthetic``: real + synthetic (r, xi, t).
- ``synthetic+classic``: both.

Every arm takes the same number of optimizer steps (``classify.steps``) and the same real images
per step (the real part of a batch is drawn from a generator seeded by the training seed alone, so
for one seed every arm sees the same real images in the same order); arms without a slot
(``real``, ``classic``) leave it empty. Differences are paired by seed: ``d_s = AUC(arm, s) -
AUC(control, s)``, with a 95 % t-interval ``mean(d) ± t(0.975, n-1) sd(d) / sqrt(n)``.

This module only computes and formats (tables, intervals, the low-data curve figure); the units
run in :func:`augment.jobs.classifier.train_arm`.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

import numpy as np

from augment.errors import UserError

ARMS = ("real", "classic", "oversample", "synthetic", "synthetic+classic")
CONTROLS = ("real", "classic", "oversample")  # what a user would do without synthetic data
#: arm -> (slot filled with, classic augmentation)
SPEC = {"real": (None, False), "classic": (None, True), "oversample": ("oversample", False),
        "synthetic": ("synthetic", False), "synthetic+classic": ("synthetic", True)}


def parse_arms(value: Any) -> list[str]:
    """``classify.arms`` as a list of known arm names (order kept, duplicates dropped)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip().lower().replace(" ", "")
            if not name:
                continue
            if name not in SPEC:
                close = difflib.get_close_matches(name, ARMS, n=1, cutoff=0.5)
                hint = f"did you mean {close[0]}? " if close else ""
                raise UserError(f"unknown arm '{name}': {hint}arms are {', '.join(ARMS)}")
            if name not in names:
                names.append(name)
    return names


def parse_curve(value: Any) -> list[int | None]:
    """``classify.curve`` points: positive integers or ``all`` (None = no limit); [] = no curve."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, int)) else list(value)
    points: list[int | None] = []
    for item in items:
        for v in str(item).split(","):
            v = v.strip().lower()
            if not v:
                continue
            if v == "all":
                point = None
            else:
                try:
                    point = int(v)
                except ValueError:
                    raise UserError(f"classify.curve point '{v}': use whole numbers of positives or all "
                                    "(e.g. classify.curve=[20,40,100,all])") from None
                if point < 1:
                    raise UserError(f"classify.curve point {point}: use at least 1 positive per class")
            if point not in points:
                points.append(point)
    return points


def point_name(point: int | None) -> str:
    return "all" if point is None else str(point)


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean, sd and 95 % t-interval of ``values`` (NaN/None skipped); interval None below 2 values."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    out: dict[str, Any] = {"mean": None, "sd": None, "lo": None, "hi": None, "n": int(len(v))}
    if len(v) == 0:
        return out
    out["mean"] = float(v.mean())
    if len(v) > 1:
        sd = float(v.std(ddof=1))
        half = float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
        out.update(sd=sd, lo=out["mean"] - half, hi=out["mean"] + half)
    else:
        out["sd"] = 0.0
    return out


def paired(a: dict[int, float | None], b: dict[int, float | None]) -> dict[str, Any]:
    """Paired differences a - b over the seeds both have, with their t-interval."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    d = [float(a[s]) - float(b[s]) for s in seeds]
    return {**t_interval(d), "seeds": seeds, "values": d}


def compare(units: list[dict], arms: list[str], classes: list[str]) -> dict[str, Any]:
    """Per-arm AUC statistics and paired differences from the units of one point.

    ``units``: ``{"arm", "seed", "test": {"auc": {class: ...}, "mean_auc"}, "steps"}`` each.
    Returns ``{"arms": {arm: {"auc": {class|mean_auc: t_interval + per-seed values}, "steps": {seed: n}}},
    "vs_real": {arm: {class|mean_auc: paired}}, "best_control": name, "synthetic_vs_best_control":
    {class|mean_auc: paired}}`` (the last two only when a synthetic and a control arm ran).
    """
    keys = [*classes, "mean_auc"]

    def score(u: dict, k: str) -> float | None:
        return u["test"]["mean_auc"] if k == "mean_auc" else u["test"]["auc"].get(k)

    per: dict[str, dict[str, dict[int, float | None]]] = {a: {k: {} for k in keys} for a in arms}
    steps: dict[str, dict[int, int]] = {a: {} for a in arms}
    for u in units:
        for k in keys:
            per[u["arm"]][k][int(u["seed"])] = score(u, k)
        steps[u["arm"]][int(u["seed"])] = int(u["steps"])
    out: dict[str, Any] = {"arms": {}, "vs_real": {}}
    for a in arms:
        out["arms"][a] = {"auc": {k: {**t_interval(list(per[a][k].values())), "values": per[a][k]} for k in keys},
                          "steps": steps[a]}
    if "real" in arms:
        for a in arms:
            if a != "real":
                out["vs_real"][a] = {k: paired(per[a][k], per["real"][k]) for k in keys}
    controls = [a for a in CONTROLS if a in arms]
    if "synthetic" in arms and controls:
        best = max(controls, key=lambda a: -math.inf if out["arms"][a]["auc"]["mean_auc"]["mean"] is None
                   else out["arms"][a]["auc"]["mean_auc"]["mean"])
        out["best_control"] = best
        out["synthetic_vs_best_control"] = {k: paired(per["synthetic"][k], per[best][k]) for k in keys}
    return out


def _ms(s: dict) -> str:
    if s["mean"] is None:
        return "undefined"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}"


def _ci(s: dict) -> str:
    if s["mean"] is None:
        return "undefined"
    if s["lo"] is None:
        return f"{s['mean']:+.3f} (n={s['n']})"
    mark = " *" if s["lo"] > 0 or s["hi"] < 0 else ""
    return f"{s['mean']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}]{mark}"


def table(result: dict, arms: list[str], classes: list[str]) -> str:
    """Markdown: per-class test AUC per arm (mean ± sd over seeds), then the paired differences
    (95 % t-intervals over seeds; * marks an interval that excludes 0)."""
    from augment.common import markdown_table

    keys = [*classes, "mean_auc"]
    label = {k: ("mean AUC" if k == "mean_auc" else k) for k in keys}
    steps = {a: sorted(set(result["arms"][a]["steps"].values())) for a in arms}
    rows = [[a, *[_ms(result["arms"][a]["auc"][k]) for k in keys], ",".join(map(str, steps[a]))] for a in arms]
    parts = [markdown_table(rows, ["arm", *[label[k] for k in keys], "steps"])]
    diff_rows = [[f"{a} − real", *[_ci(result["vs_real"][a][k]) for k in keys]] for a in result["vs_real"]]
    if "synthetic_vs_best_control" in result:
        diff_rows.append([f"synthetic − {result['best_control']} (best control)",
                          *[_ci(result["synthetic_vs_best_control"][k]) for k in keys]])
    if diff_rows:
        parts.append(markdown_table(diff_rows, ["paired difference (95 % t-interval over seeds)", *[label[k] for k in keys]]))
    return "\n\n".join(parts)


def curve_plot(points: dict[str, dict], arms: list[str], classes: list[str], path: Path, title: str) -> Path:
    """Test AUC (mean ± sd over seeds) vs real positives per class, one line per arm, one panel per
    class plus the mean AUC. ``points``: point name -> :func:`compare` result; ``all`` is drawn last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points)
    xs = list(range(len(names)))
    keys = [*classes, "mean_auc"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for a in arms:
            m = [points[p]["arms"][a]["auc"][k]["mean"] for p in names]
            sd = [points[p]["arms"][a]["auc"][k]["sd"] or 0.0 for p in names]
            m_arr = np.asarray([np.nan if v is None else v for v in m], dtype=float)
            ax.errorbar(xs, m_arr, yerr=sd, marker="o", ms=3, lw=1.2, capsize=2, label=a)
        ax.set_xticks(xs, names)
        ax.set_xlabel("real positives per class")
        ax.set_ylabel("test AUC")
        ax.set_title("mean AUC" if k == "mean_auc" else k, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ARMS", "CONTROLS", "SPEC", "compare", "curve_plot", "paired", "parse_arms", "parse_curve",
           "point_name", "t_interval", "table"]
