"""Plots and the run report: ``report.md`` and a self-contained ``report.html`` (images embedded).

Reads what the steps of ``augment run`` wrote (``train/``, ``baseline/``, ``synthetic/``,
``augmented/``, ``evaluate/`` under the run folder): nothing is recomputed here except plots.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from scipy import stats
from sklearn.metrics import roc_curve

from augment.common import markdown_table, versions
from augment.data.sources import load_table
from augment.metrics.localisation import localisation_markdown


STEP_DIRS = ("train", "baseline", "synthetic", "augmented", "evaluate")


def _plt():
    matplotlib.use("Agg")  # files only, never a window (set at the first plot, not at import)
    return plt


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def paired_difference(baseline: list[float | None], augmented: list[float | None]) -> dict[str, Any]:
    """Mean of the per-seed differences (augmented - baseline) with a 95 % t-interval over seeds."""
    d = [a - b for a, b in zip(augmented, baseline) if a is not None and b is not None]
    if not d:
        return {"mean": None, "ci95": None, "n": 0}
    mean = float(np.mean(d))
    if len(d) < 2:
        return {"mean": mean, "ci95": None, "n": len(d)}
    half = float(stats.t.ppf(0.975, len(d) - 1) * np.std(d, ddof=1) / math.sqrt(len(d)))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(d)}


def auc_table(base: dict, aug: dict) -> tuple[list[list[str]], dict]:
    """Rows of the AUC table (class, baseline, augmented, paired difference and its 95 % CI)."""
    rows, out = [], {}
    classes = base["classes"]
    for c in [*classes, "mean AUC"]:
        b = base["summary"]["mean_auc"] if c == "mean AUC" else base["summary"]["auc"][c]
        a = aug["summary"]["mean_auc"] if c == "mean AUC" else aug["summary"]["auc"][c]
        diff = paired_difference(b["values"], a["values"])
        out[c] = {"baseline": b, "augmented": a, "difference": diff}
        ci = diff["ci95"]
        rows.append([c, _ms(b), _ms(a), "-" if diff["mean"] is None else f"{diff['mean']:+.3f}",
                     "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"])
    return rows, out


def _ms(s: dict) -> str:
    if s.get("mean") is None:
        return "undefined"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s.get("n", 0) > 1 else f"{s['mean']:.3f}"


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def roc_figure(run: Path, classes: list[str], path: Path) -> Path | None:
    """ROC per class, baseline vs augmented, every seed (from the saved test predictions)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(classes), figsize=(3.3 * len(classes), 3.3), squeeze=False)
    drawn = False
    for ax, (j, c) in zip(axes[0], enumerate(classes)):
        for mode, color in (("baseline", "tab:blue"), ("augmented", "tab:red")):
            for k, npz in enumerate(sorted((run / mode).glob("seed*/test_predictions.npz"))):
                d = np.load(npz)
                y, p = d["labels"][:, j], d["probs"][:, j]
                keep = ~np.isnan(y)
                if len(np.unique(y[keep])) < 2:
                    continue
                fpr, tpr, _ = roc_curve(y[keep], p[keep])
                ax.plot(fpr, tpr, color=color, lw=1, alpha=0.8, label=mode if k == 0 else None)
                drawn = True
        ax.plot([0, 1], [0, 1], "k:", lw=0.7)
        ax.set_title(c, fontsize=10)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path if drawn else None


def sample_grid(real: list[tuple[str, np.ndarray]], synthetic: list[tuple[str, np.ndarray, list[np.ndarray]]],
                classes: list[str], path: Path, per_class: int = 6) -> Path:
    """Rows per class: real images, then synthetic images with their masks outlined in red."""
    plt = _plt()
    fig, axes = plt.subplots(2 * len(classes), per_class, figsize=(1.5 * per_class, 1.55 * 2 * len(classes)), squeeze=False)
    for r, c in enumerate(classes):
        reals = [im for cc, im in real if cc == c][:per_class]
        syns = [(im, ms) for cc, im, ms in synthetic if cc == c][:per_class]
        for k in range(per_class):
            for row, item in ((2 * r, reals[k] if k < len(reals) else None), (2 * r + 1, syns[k] if k < len(syns) else None)):
                ax = axes[row, k]
                ax.set_xticks([])
                ax.set_yticks([])
                if item is None:
                    ax.axis("off")
                    if k == 0 and row == 2 * r + 1 and not syns:  # say so rather than leave a blank row
                        ax.text(0.0, 0.5, f"{c}: no synthetic image passed the pseudo-label threshold",
                                transform=ax.transAxes, fontsize=8, va="center", ha="left", clip_on=False)
                    continue
                im, masks = (item, []) if row == 2 * r else item
                ax.imshow(im, cmap="gray", vmin=0, vmax=255)
                for m in masks:
                    if m.any():
                        ax.contour(m, levels=[0.5], colors="red", linewidths=0.7)
                if k == 0:
                    ax.set_ylabel(f"{c}\n{'real' if row == 2 * r else 'synthetic'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mask_overlay_figure(examples: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Per finding, three rows of lesion images: the input with the predicted mask outlined in red (and
    the ground truth in green, or the lung fields in blue, where known), the healed image, and the
    difference map (added opacity bright)."""
    plt = _plt()
    classes = [c for c in examples if examples[c]]
    ncol = max(len(examples[c]) for c in classes)
    fig, axes = plt.subplots(3 * len(classes), ncol, figsize=(1.5 * ncol, 1.5 * 3 * len(classes) + 0.4), squeeze=False)
    for r, c in enumerate(classes):
        for k in range(ncol):
            for j in range(3):
                ax = axes[3 * r + j, k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k >= len(examples[c]):
                    ax.axis("off")
                    continue
                e = examples[c][k]
                if j == 0:
                    ax.imshow(e["image"], cmap="gray", vmin=0, vmax=255)
                    for m, colour in ((e.get("gt"), "lime"), (e.get("lungs") if e.get("gt") is None else None, "deepskyblue"),
                                      (e["mask"], "red")):
                        if m is not None and np.asarray(m).any():
                            ax.contour(np.asarray(m, dtype=float), levels=[0.5], colors=colour, linewidths=0.7)
                elif j == 1:
                    ax.imshow((np.asarray(e["healed"]) + 1.0) * 127.5, cmap="gray", vmin=0, vmax=255)
                else:
                    ax.imshow(np.clip(e["map"], 0, None), cmap="magma", vmin=0, vmax=max(float(np.max(e["map"])), 1e-6))
                if k == 0:
                    ax.set_ylabel(f"{c}\n{('input', 'healed', 'map')[j]}", fontsize=8)
    if title:
        fig.suptitle(f"{title} (red: mask; green: ground truth; blue: lungs)", fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _grid_inputs(run: Path, cfg: dict, classes: list[str], per_class: int) -> tuple[list, list]:
    table = load_table(cfg["data"], show_progress=False)
    real = []
    for c in classes:
        idx = np.flatnonzero(table.column(c) == 1)[:per_class]
        real += [(c, np.asarray(table.images[i])) for i in idx]
    syn = []
    labels = run / "synthetic" / "labels.csv"
    if labels.is_file():
        df = pd.read_csv(labels, keep_default_na=False)
        for c in classes:
            rows = df[df["Image Index"].str.startswith(c.lower() + "-") | df["Finding Labels"].str.split("|").map(lambda v: c in v)]
            for _, row in rows.head(per_class).iterrows():
                im = np.asarray(Image.open(run / "synthetic" / row["file"]))
                masks = [np.asarray(Image.open(run / "synthetic" / m)) > 127 for m in str(row["mask"]).split("|")
                         if m and m.endswith(f"_{c}.png")]
                syn.append((c, im, masks))
    return real, syn


def _arms_section(run: Path, aug: dict, figs: Path) -> list[str]:
    """The headline: every arm at one step budget, paired by seed (``augment classify --arms``)."""
    from augment.arms import curve_plot

    arms, classes = list(aug["arms"]), list(aug["classes"])
    md = ["## Does the synthetic data help? Arms at an equal training budget", "",
          f"{aug['model']} at {aug['image_size']} px on data={aug['data']}, seeds {', '.join(map(str, aug['seeds']))}. "
          "Every arm trains the same number of optimizer steps with the same real images per step: `real` (real images "
          "only), `classic` (standard augmentation), `oversample` (the synthetic slot filled with repeated real positives), "
          "`synthetic` and `synthetic+classic`. Differences are paired by seed with a 95 % t-interval; * marks an "
          "interval that excludes 0. The test split is internal (one source), which flatters every arm.", ""]
    if "curve" in aug:
        for point in aug["points"]:
            md += [f"### {point} real positives per class", "", aug["table"][point], ""]
        plot = curve_plot(aug["curve"], arms, classes, figs / "curve.png", "test AUC vs real positives")
        md += [f"![test AUC vs real positives]({plot.relative_to(run)})", ""]
    else:
        budget = aug.get("budget") or {}
        md += [f"{budget.get('steps', '?')} steps per arm and seed, batch {budget.get('batch_size', '?')} = "
               f"{budget.get('real_per_step', '?')} real + {budget.get('slot_per_step', '?')} slot images.", "",
               aug["table"], ""]
        bars = arms_figure(aug["comparison"], arms, classes, figs / "arms.png")
        md += [f"![test AUC per arm]({bars.relative_to(run)})", ""]
    return md


def arms_figure(comparison: dict, arms: list[str], classes: list[str], path: Path) -> Path:
    """Grouped bars: test AUC per class (and the mean) for each arm, mean ± sd over seeds, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [*classes, "mean_auc"]
    width = 0.8 / max(1, len(arms))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(keys), 3.4))
    for i, arm in enumerate(arms):
        auc = comparison["arms"][arm]["auc"]
        xs = [k + (i - (len(arms) - 1) / 2) * width for k in range(len(keys))]
        means = [auc[k]["mean"] if auc[k]["mean"] is not None else float("nan") for k in keys]
        sds = [auc[k]["sd"] or 0.0 for k in keys]
        ax.bar(xs, means, width, yerr=sds, capsize=2, label=arm, color=plt.cm.tab10(i))
        for x, k in zip(xs, keys):
            vals = [v for v in auc[k]["values"].values() if v is not None]
            ax.plot([x] * len(vals), vals, "k.", markersize=3)
    ax.set_xticks(range(len(keys)), [("mean AUC" if k == "mean_auc" else k) for k in keys])
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("test AUC")
    ax.legend(fontsize=7, ncol=min(5, len(arms)), loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _localisation_section(loc: dict, run: Path, figs: Path) -> list[str]:
    """Evaluate's scores on real lesion ground truth (``evaluate.localisation``): the box and mask
    tables of each set, and its overlay figure copied beside the report."""
    srcs = ", ".join(loc.get("sources") or [])
    md = ["## Localisation on real lesion ground truth", "",
          f"Mask sources: {srcs}. Every source goes through the same map -> mask rule; `random` is the control "
          "every source must beat.", ""]
    for block in localisation_markdown({k: v for k, v in loc.items() if isinstance(v, dict)}):
        md += [line for line in block.splitlines() if not line.startswith("Overlays: ")] + [""]
    for name, r in loc.items():
        fig = Path(r["figure"]) if isinstance(r, dict) and r.get("figure") else None
        if fig is not None and fig.is_file():
            dest = figs / f"localisation_{name}.png"
            dest.write_bytes(fig.read_bytes())
            md += [f"![localisation overlays: {name}]({dest.relative_to(run)})", ""]
    return md


def build_report(run: Path, cfg: dict, timings: dict[str, float]) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` into ``run``; returns their paths."""
    run = Path(run)
    figs = run / "report_files"
    figs.mkdir(exist_ok=True)
    base, aug = _load(run / "baseline" / "metrics.json"), _load(run / "augmented" / "metrics.json")
    ev, gen, train = _load(run / "evaluate" / "metrics.json"), _load(run / "synthetic" / "dataset.json"), _load(run / "train" / "metrics.json")
    classes = (base or aug or {}).get("classes") or list(cfg.get("classes") or [])
    md: list[str] = [f"# augment report: {cfg.get('choices', {}).get('experiment', 'run')}", ""]
    d = cfg["data"]
    md += ["## Configuration", "",
           markdown_table([["data", f"{d['name']} ({d.get('root') or 'procedural'}), {d['image_size']} px"],
                           ["classes", ", ".join(classes)],
                           ["classifier", cfg["classifier"]["model_name"]],
                           ["sampler / translator", f"{cfg['generate']['sampler']} / {cfg['generate']['translator']}"],
                           ["seeds", ", ".join(map(str, cfg["classify"]["seeds"]))],
                           ["synthetic images", f"{cfg['generate']['n']} requested at pseudo-label threshold t={cfg['generate']['threshold']}"
                            + (f"; kept {sum(gen['counts'].values())} ("
                               + ", ".join(f"{c} {n}" for c, n in gen["counts"].items()) + ")" if gen and gen.get("counts") else "")],
                           ["mix", f"ratio r={cfg['classify']['ratio']}, weight xi={cfg['classify']['xi']}"],
                           ["real positives limited to", json.dumps(cfg["classify"].get("limit_positives") or {}) or "-"]],
                          ["setting", "value"]), ""]
    try:
        real, syn = _grid_inputs(run, cfg, classes, 6)
        grid = sample_grid(real, syn, classes, figs / "samples.png")
        md += ["## Real vs synthetic samples", "", "Odd rows real, even rows synthetic; red outlines are the synthetic masks.", "",
               f"![samples]({grid.relative_to(run)})", ""]
    except (OSError, ValueError, KeyError) as exc:
        md += ["## Real vs synthetic samples", "", f"not available: {exc}", ""]
    summary: dict[str, Any] = {}
    if aug and aug.get("mode") == "arms":
        md += _arms_section(run, aug, figs)
    elif base and aug:
        rows, summary = auc_table(base, aug)
        md += ["## Classifier AUC on the held-out test split", "",
               f"{base['model']} at {base['image_size']} px, {len(base['seeds'])} seed(s); difference = augmented - baseline, "
               "paired by seed, with a 95 % t-interval over seeds.", "",
               markdown_table(rows, ["class", "baseline", "augmented", "difference", "95 % CI"]), ""]
        roc = roc_figure(run, classes, figs / "roc.png")
        if roc:
            md += [f"![ROC baseline vs augmented]({roc.relative_to(run)})", ""]
    if ev and ev.get("image_quality"):
        iq = ev["image_quality"]
        o = iq["overall"]
        md += ["## Image quality", "", f"{iq['n_synthetic']} synthetic vs {iq['n_real_train']} real training images; "
               f"floor = real test vs real train. Features: `{iq['extractor']}`.", "",
               markdown_table([[k.upper(), _f(o.get(k)), _f(o.get(f"{k}_floor"))] for k in ("fid", "kid", "precision", "recall", "is")],
                              ["metric", "synthetic", "floor"]), "",
               markdown_table([[c, r["n_synthetic"], _f(r.get("fid")), _f(r.get("fid_floor")), _f(r.get("class_fidelity")),
                                _f(r.get("class_fidelity_floor"))] for c, r in iq["per_class"].items()],
                              ["class", "n", "FID", "floor", "class fidelity", "floor"]), ""]
    if ev and ev.get("masks"):
        keys = ["dice_mean", "iou_mean", "poi_mean", "detection_auc", "sensitivity_at_1fp", "healing_psnr_mean", "identity_l1_mean"]
        rows = [[fam, c, *[_f(m["per_class"][c].get(k)) for k in keys]] for fam, m in ev["masks"].items() for c in m["per_class"]]
        md += ["## Mask quality (translator on the test split)", "",
               markdown_table(rows, ["translator", "finding", "Dice", "IoU", "PoI", "det. AUC", "sens@1FP", "PSNR dB", "identity L1"]), ""]
    if ev and ev.get("localisation"):
        md += _localisation_section(ev["localisation"], run, figs)
    rows = [[k, f"{v:.1f}"] for k, v in timings.items()]
    if train:
        rows += [[f"train {m['family']} steps/s", _f(m.get("steps_per_second"))] for m in train["models"].values()]
    if gen:
        rows += [["generate images/s", _f(gen.get("timings", {}).get("images_per_second"))]]
    md += ["## Timings and throughput", "", markdown_table(rows, ["what", "value (seconds unless stated)"]), ""]
    md += ["## Versions", "", markdown_table([[k, v] for k, v in versions().items()], ["package", "version"]), ""]
    text = "\n".join(md)
    (run / "report.md").write_text(text)
    (run / "report.html").write_text(to_html(text, run))
    (run / "report_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return {"md": run / "report.md", "html": run / "report.html"}


def to_html(markdown: str, root: Path) -> str:
    """A small Markdown subset (headings, tables, images, paragraphs) to self-contained HTML."""
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>augment report</title><style>",
           "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
           "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}",
           "h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ddd;margin-top:1.6em}code{background:#f5f5f5}",
           "</style></head><body>"]
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            head, body = block[0], block[2:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
            continue
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m:
            data = base64.b64encode((root / m.group(2)).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(m.group(1))}' src='data:image/png;base64,{data}'></p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out)


def _inline(text: str) -> str:
    return re.sub(r"`(.*?)`", r"<code>\1</code>", html.escape(text))
