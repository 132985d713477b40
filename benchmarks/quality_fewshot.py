"""Few-shot sampler recipes at equal CPU time (issue 17 item 5): learning curves of domain KID / FID and
class fidelity vs CPU-minutes, one continuous run per (data set, recipe).

Recipes (``--recipes``), each a list of ``augment train`` overrides on top of the data set's experiment,
all pinning the same keys (:data:`TODAY`), so a recipe keeps its meaning when the YAML defaults change:

* ``today``: the CGAN as shipped before issue 17 (DCGAN, BCE, no spectral norm, few-shot tools off);
* ``diffaug``: DiffAugment ``translation,cutout,brightness,contrast`` at p = 1 on every D input;
* ``diffaug+lecam``: the same plus LeCam (``lecam_weight`` 0.1);
* ``ada+lecam``: the same policy with an adaptive (ADA) probability starting at 0, plus LeCam 0.1;
* ``fastgan+diffaug``: the FastGAN-style CGAN (``generator.arch=fastgan``) with the DiffAugment policy
  and spectral norm.

Data sets (``--datasets``): ``phantom`` (``experiment=quickstart``: 64 px, Edema / Hernia / Effusion,
30 real positives per class) and ``kermany`` (``experiment=kermany`` at 64 px, Pneumonia limited to 40
real positives, the quickstart's generator widths 32 and z 64; needs ``../shared/data/cxr-real``).

Clock: the **CPU time of the training process** (``time.process_time``: user + system seconds of all
its threads), counted from the first step; checkpoint writes of this script are excluded. Training runs
on the CPU with ``--threads`` torch threads (default 1) and no DataLoader workers, so every CPU second
of the run is in the count. One ``augment train``-equivalent run per (data set, recipe)
(:func:`augment.jobs.gan.train_model` with a :class:`CPUMarks` hook): when the clock crosses a mark
(``--minutes``, default 2,5,10,20) the hook writes a copy of the checkpoint (``marks/<minute>.pt``) and
the step reached; after the last mark it ends the run (``state.stop``). The run resumes from its last
mark (or a ``--save-every`` CPU-seconds checkpoint) with the CPU time spent so far, so a stopped or
extended command (more marks) continues the same run.

At each mark (EMA generator, eval mode), with the data set's judge:

* domain KID (mean ± sd over ``evaluate.kid_subsets`` subsets, see :meth:`Judge.kid`) and FID of
  ``--samples`` images against the real train split, through ``augment.metrics`` as ``augment
  evaluate`` computes them; the samples' labels are drawn from the real train rows' label vectors
  (healthy included), so classes come **in proportion to the train split**; floor = real test vs
  real train. Real rows are those a sampler of the classes models (healthy, or only these classes);
* class fidelity per class: of ``--fidelity-samples`` draws conditioned on class c alone, the share
  whose judge p(c) >= 0.5 (``augment.metrics.scores.class_fidelity``); floor = the judge's rate on the
  real test positives of c.

The judge (= the domain feature extractor) is trained once per data set on real images only: ResNet-18
from scratch, ``--judge-epochs`` epochs (default 15, no early stop; the best validation epoch is kept),
seed 0, class-balanced, on **all** real train positives (a measuring instrument, not a low-data model);
like `augment classify` (``augment.jobs.classifier.train_seed``). On the phantom, 5 epochs gave test
AUC Edema 0.98 / Hernia 0.48 / Effusion 0.86; 15 epochs 0.99 / 0.70 / 0.88 (about 2.5 CPU-minutes). A
class the judge does not recognise (see its floor) has no meaningful fidelity.

Writes to ``--out``: ``<dataset>/judge/``, ``<dataset>/<recipe>/`` (``model/checkpoint.pt``,
``marks/``, ``marks.json``, ``eval.json``, ``grid_<minute>.png``), then ``curves.json``, ``curves.md``
and ``curves.png``. A rerun skips finished runs and evaluations; ``--table-only`` only gathers.

    python benchmarks/quality_fewshot.py --out runs/results/fewshot_curves        # ~3.7 CPU-hours, 1 core
    # or one process per data set on two free cores (~2 h), then one table and figure of both:
    python benchmarks/quality_fewshot.py --out runs/results/fewshot_curves --datasets phantom &
    python benchmarks/quality_fewshot.py --out runs/results/fewshot_curves --datasets kermany &
    wait; python benchmarks/quality_fewshot.py --out runs/results/fewshot_curves --table-only
    python benchmarks/quality_fewshot.py --out /tmp/qf --quick --recipes today,diffaug   # ~1 minute

Cost: training is 20 CPU-minutes per (data set, recipe), 200 for the ten runs; the judges about 2.5
(phantom) and 10 (Kermany) CPU-minutes; measuring about 10 CPU-seconds per mark. Steps reached differ by
recipe: at 64 px and the quickstart widths a DCGAN step costs about 0.28 CPU-s, a FastGAN step about 2.2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment.common import markdown_table, resolve_classes  # noqa: E402
from augment.config import compose, to_dict  # noqa: E402
from augment.data.labels import VOCABULARY  # noqa: E402
from augment.data.sources import load_table  # noqa: E402
from augment.errors import UserError  # noqa: E402
from augment.jobs.classifier import train_seed  # noqa: E402
from augment.jobs.gan import train_model, training_rows  # noqa: E402
from augment.metrics import fid as F  # noqa: E402
from augment.metrics import scores as S  # noqa: E402
from augment.models import load_model, sha256  # noqa: E402
from classifiers.model import load_classifier  # noqa: E402
from cxrbase import to_uint8, to_x, write_png  # noqa: E402
from generators.train import CheckpointHook, HookBase, TrainState, image_grid  # noqa: E402

POLICY = "translation,cutout,brightness,contrast"

#: Today's recipe (the CGAN YAML as shipped before issue 17's choice), pinned key by key so that a recipe
#: keeps its meaning when the YAML defaults change.
TODAY = {"generator.arch": "dcgan", "generator.loss": "bce", "generator.spectral_norm": "false",
         "generator.fewshot.diffaug": "null", "generator.fewshot.diffaug_p": "1.0",
         "generator.fewshot.diffaug_adaptive": "false", "generator.fewshot.lecam_weight": "0.0"}
_DIFFAUG = {"generator.fewshot.diffaug": f"'{POLICY}'"}  # quoted: a bare comma list is a Hydra sweep
_LECAM = {"generator.fewshot.lecam_weight": "0.1"}

#: recipe -> what it changes in TODAY.
CHANGES: dict[str, dict[str, str]] = {
    "today": {},
    "diffaug": _DIFFAUG,
    "diffaug+lecam": {**_DIFFAUG, **_LECAM},
    "ada+lecam": {**_DIFFAUG, "generator.fewshot.diffaug_adaptive": "true", "generator.fewshot.diffaug_p": "0.0", **_LECAM},
    "fastgan+diffaug": {"generator.arch": "fastgan", **_DIFFAUG, "generator.spectral_norm": "true"},
}
#: recipe -> `augment train` overrides on top of the data set's experiment.
RECIPES: dict[str, list[str]] = {name: [f"{k}={v}" for k, v in {**TODAY, **ch}.items()] for name, ch in CHANGES.items()}


@dataclass(frozen=True)
class DataSpec:
    overrides: tuple[str, ...]
    shared: bool  # reads ../shared/data/cxr-real (data.root is set to --real-root)
    quick: tuple[str, ...] = ()  # its own --quick overrides (beside QUICK_OVERRIDES)


DATASETS: dict[str, DataSpec] = {
    "phantom": DataSpec(("experiment=quickstart",), shared=False, quick=("data.n=400",)),
    "kermany": DataSpec(("experiment=kermany", "data.image_size=64", "classify.limit_positives={Pneumonia: 40}",
                         "generator.g_channels=32", "generator.d_channels=32", "generator.z_dim=64"), shared=True),
}

#: --quick: 32 px, tiny widths and judge, a small phantom (seconds per run).
QUICK_OVERRIDES = ("data.image_size=32", "generator.g_channels=8", "generator.d_channels=8",
                   "generator.z_dim=16", "train.batch_size=16", "evaluate.kid_subsets=5", "evaluate.kid_subset_size=100")
FOREVER = 10**8  # max_steps / ckpt_every of the runs: the CPU marks end them
CLOCK = "time.process_time (CPU seconds of the training process, all threads, user + system)"


def _choice(kind: str, names: str, options: dict) -> list[str]:
    out = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in options:
            close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.4)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"unknown {kind} '{name}': {hint}choose from {', '.join(options)} (--{kind}s a,b)")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"--{kind}s is empty: choose from {', '.join(options)}")
    return out


def _minutes(text: str) -> list[float]:
    try:
        marks = [float(m) for m in text.split(",") if m.strip()]
    except ValueError:
        raise UserError(f"--minutes {text!r}: give CPU-minute marks as numbers, e.g. 2,5,10,20") from None
    if not marks or any(not math.isfinite(m) or m <= 0 for m in marks) or marks != sorted(set(marks)):
        raise UserError(f"--minutes {text!r}: give increasing positive CPU-minute marks, e.g. 2,5,10,20")
    return marks


def _key(minute: float) -> str:
    return f"{minute:g}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------------------------------
# Training: one run per (data set, recipe), snapshots at CPU-time marks.


class CPUMarks(HookBase):
    """Snapshot the checkpoint when the run's CPU time crosses each mark; stop after the last one.

    The run's CPU time = the CPU time at the resumed step (from ``marks.json``) + ``time.process_time()``
    since ``before_train`` - the seconds this hook spent writing files. Every write records the step's
    CPU time first, so a run resumed from any of its checkpoints knows the time it had spent.
    """

    def __init__(self, run_dir: Path, marks_min: list[float], save_every_s: float) -> None:
        self.run_dir, self.marks_min, self.save_every_s = run_dir, marks_min, save_every_s
        self.book_path = run_dir / "marks.json"

    def before_train(self, state: TrainState) -> None:
        self.book = _read_json(self.book_path)
        self.book.setdefault("resume_cpu_s", {})
        self.book.setdefault("marks", {})
        if state.step == 0:
            self.offset = 0.0
        elif str(state.step) in self.book["resume_cpu_s"]:
            self.offset = float(self.book["resume_cpu_s"][str(state.step)])
        else:
            raise UserError(f"{self.run_dir}: its checkpoint at step {state.step} has no CPU-time record; "
                            "delete that folder to train the run again")
        self.pending = [m for m in self.marks_min if _key(m) not in self.book["marks"]]
        early = [m for m in self.pending if m * 60 <= self.offset]
        if early:
            raise UserError(f"{self.run_dir}: mark {_key(early[0])} CPU-min lies before the run's checkpoint at "
                            f"{self.offset / 60:.2f} CPU-min; use a new --out to measure it")
        self.excluded = 0.0
        self.last_save = self.offset
        self.t0 = time.process_time()
        self.wall0 = time.perf_counter()

    def cpu_s(self) -> float:
        return self.offset + time.process_time() - self.t0 - self.excluded

    def after_step(self, state: TrainState) -> None:
        if not self.pending:  # a loop that ignores state.stop would otherwise train forever
            raise RuntimeError("fit ran on after the last CPU mark set state.stop")
        cpu = self.cpu_s()
        crossed = [m for m in self.pending if cpu >= m * 60]
        if not crossed and cpu - self.last_save < self.save_every_s:
            return
        t = time.process_time()
        saver = CheckpointHook(self.run_dir / "model" / "checkpoint.pt", FOREVER)
        for m in crossed:  # the snapshot first: a mark is booked only when its file exists
            saver.path = self.run_dir / "marks" / f"{_key(m)}.pt"
            saver.save(state)
            self.book["marks"][_key(m)] = {"minute": m, "cpu_s": cpu, "step": state.step,
                                          "wall_s": time.perf_counter() - self.wall0, "file": f"marks/{_key(m)}.pt"}
        self.book["resume_cpu_s"][str(state.step)] = cpu
        _write_json(self.book_path, self.book)
        saver.path = self.run_dir / "model" / "checkpoint.pt"
        saver.save(state)
        self.pending = [m for m in self.pending if m not in crossed]
        self.last_save = cpu
        self.excluded += time.process_time() - t
        if not self.pending:
            state.stop = True


def dataset_overrides(name: str, args: argparse.Namespace) -> list[str]:
    spec = DATASETS[name]
    extra = [f"data.root={args.real_root}"] if spec.shared else []
    quick = (*QUICK_OVERRIDES, *spec.quick) if args.quick else ()
    return [*spec.overrides, *extra, *quick, f"seed={args.seed}", *args.override]


def train_run(dataset: str, recipe: str, args: argparse.Namespace, run_dir: Path) -> None:
    """Train (or continue) the run until every mark is booked."""
    book = _read_json(run_dir / "marks.json")
    overrides = [*dataset_overrides(dataset, args), *RECIPES[recipe], "runtime=inline", "progress=false",
                 "train.device=cpu", "train.num_workers=0", f"train.max_steps={FOREVER}", f"train.ckpt_every={FOREVER}",
                 "train.sample_every=null", "train.resume=true"]
    if book.get("overrides") not in (None, overrides) or book.get("threads") not in (None, args.threads):
        raise UserError(f"{run_dir} was trained with other settings ({' '.join(book['overrides'])}, threads "
                        f"{book['threads']}): use a new --out for other settings")
    if all(_key(m) in book.get("marks", {}) for m in args.marks):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / "marks.json", {**book, "overrides": overrides, "clock": CLOCK, "threads": args.threads})
    cfg = compose(overrides)
    table = load_table(cfg.data, show_progress=False)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    changes = " ".join(f"{k}={v}" for k, v in CHANGES[recipe].items()) or "(today's settings)"
    print(f"[{dataset} / {recipe}] training to {_key(args.marks[-1])} CPU-min: {changes}",
          flush=True)
    train_model({"cfg": to_dict(cfg), "kind": "generator", "family": str(cfg.choices.generator), "classes": classes,
                 "out": str(run_dir / "model")}, hooks=[CPUMarks(run_dir, args.marks, args.save_every)])


# ----------------------------------------------------------------------------------------------------
# Measuring: one judge per data set, metrics per mark.


@dataclass
class Judge:
    """The data set's real-only classifier (domain features + class fidelity) and the real references."""

    model: Any
    extractor: Any
    path: Path
    classes: list[str]
    cols: list[int]
    ecfg: Any
    f_train: np.ndarray
    y_train: np.ndarray
    stats_train: Any
    floor: dict
    fid_note: str = ""

    def feats(self, images: np.ndarray) -> np.ndarray:
        return F.features(self.extractor, images, batch_size=64, device="cpu")

    @torch.no_grad()
    def probs(self, images: np.ndarray) -> np.ndarray:
        out = [torch.sigmoid(self.model(to_x(torch.from_numpy(images[i:i + 64][:, None]), "cpu")).float()).numpy()
               for i in range(0, len(images), 64)]
        return np.concatenate(out)[:, self.cols]

    kid_subset_size: int = 0  # 0: half the smaller set
    kid_shape: dict = field(default_factory=dict)  # subsets and size of the last KID

    def kid(self, feats: np.ndarray) -> tuple[float, float]:
        """KID (``augment.metrics.scores.kid``, unbiased) over ``evaluate.kid_subsets`` subsets and its sd.

        ``augment evaluate`` draws subsets of ``min(kid_subset_size, n_real, n_fake)``: with a few hundred
        images that is a whole set, so every subset is the same and the sd is 0. Here subsets hold half the
        smaller set by default (``--kid-subset-size``), so the sd shows the spread over subsets of both
        sets; the mean estimates the same MMD^2 (unbiased at any subset size).
        """
        smaller = min(len(self.f_train), len(feats))
        size = min(self.kid_subset_size or max(2, smaller // 2), int(self.ecfg.kid_subset_size), smaller)
        r = S.kid(self.f_train, feats, subsets=int(self.ecfg.kid_subsets), subset_size=size)
        self.kid_shape = {"kid_subsets": r.subsets, "kid_subset_size": r.subset_size}
        return r.mean, r.std

    def fid(self, feats: np.ndarray) -> float:
        """FID against the real train split; with fewer images than feature dimensions it is biased upwards
        (``F.SmallSampleWarning``, recorded once in ``fid_note``): compare FIDs at equal n only."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", F.SmallSampleWarning)
            value = float(F.fid_from_stats(self.stats_train, F.statistics(feats, extractor_id=self.extractor.id)).value)
        if any(issubclass(w.category, F.SmallSampleWarning) for w in caught):
            self.fid_note = (f"FID from fewer images than the judge's {feats.shape[1]} feature dimensions is biased upwards "
                             "(singular covariance): compare FIDs at equal n only; KID is unbiased")
        return value


def make_judge(dataset: str, args: argparse.Namespace, folder: Path) -> Judge:
    overrides = [*dataset_overrides(dataset, args), "classifier=tiny" if args.quick else "classifier=resnet18",
                 "classify.limit_positives={}", f"classify.epochs={args.judge_epochs}", "classify.patience=null", "classify.seeds=[0]",
                 "classify.device=cpu", "classify.num_workers=0", "classify.balanced=true", "classify.augment=false",
                 "progress=false"]
    cfg = compose(overrides)
    table = load_table(cfg.data, show_progress=False)
    classes = resolve_classes(cfg.classes, table, allow_no_finding=False)
    ckpt = folder / "seed0" / "best.pt"
    if not ckpt.is_file():
        print(f"[{dataset}] judge: {cfg.classifier.model_name}, {args.judge_epochs} epochs on the real train split", flush=True)
        t0 = time.process_time()
        info = train_seed({"cfg": to_dict(cfg), "seed": 0, "out": str(folder), "classes": classes, "synthetic": []})
        _write_json(folder / "judge.json", {"overrides": overrides, "test_auc": info["test"]["auc"],
                                            "test_mean_auc": info["test"]["mean_auc"], "cpu_s": time.process_time() - t0})
    model, meta = load_classifier(ckpt)
    model.eval()
    cols = [list(meta["classes"]).index(c) for c in classes]
    extractor = F.DomainExtractor(model, sha256=sha256(ckpt), name="domain")
    ecfg = cfg.evaluate
    tr, te = training_rows(table, classes, "train"), training_rows(table, classes, "test")
    lab = [VOCABULARY.index(c) for c in classes]
    judge = Judge(model, extractor, ckpt, classes, cols, ecfg, f_train=np.empty(0), y_train=np.nan_to_num(table.labels[tr][:, lab]),
                  stats_train=None, floor={}, kid_subset_size=args.kid_subset_size)
    judge.f_train = judge.feats(np.asarray(table.images[tr]))
    judge.stats_train = F.statistics(judge.f_train, extractor_id=extractor.id)
    test_images = np.asarray(table.images[te])
    f_test = judge.feats(test_images)
    kid, kid_sd = judge.kid(f_test)
    info = _read_json(folder / "judge.json")
    judge.floor = {"kid": kid, "kid_sd": kid_sd, **judge.kid_shape, "fid": judge.fid(f_test), "n_real_train": int(len(tr)),
                   "n_real_test": int(len(te)), "judge_test_mean_auc": info.get("test_mean_auc"),
                   "class_fidelity": S.class_fidelity(judge.probs(test_images), table.labels[te][:, lab], classes=classes),
                   "n_test_positives": {c: int(np.nansum(table.labels[te][:, j] == 1)) for c, j in zip(classes, lab)}}
    return judge


@torch.no_grad()
def _sample(system: Any, y: torch.Tensor, g: torch.Generator) -> np.ndarray:
    return np.concatenate([to_uint8(system.sample(len(y[i:i + 64]), y[i:i + 64], generator=g))
                           for i in range(0, len(y), 64)])


def measure(judge: Judge, snapshot: Path, args: argparse.Namespace, grid: Path) -> dict:
    """KID, FID and class fidelity of one mark's EMA generator."""
    system, _ = load_model(snapshot)
    k = len(judge.classes)
    rng = np.random.default_rng(args.seed + 1000)  # the same label draws and noise at every mark and recipe
    y = torch.from_numpy(judge.y_train[rng.choice(len(judge.y_train), args.samples, replace=True)]).float()
    images = _sample(system, y, torch.Generator().manual_seed(args.seed + 1001))
    feats = judge.feats(images)
    kid, kid_sd = judge.kid(feats)
    y1 = torch.eye(k).repeat_interleave(args.fidelity_samples, dim=0)
    cond = _sample(system, y1, torch.Generator().manual_seed(args.seed + 1002))
    fidelity = S.class_fidelity(judge.probs(cond), y1.numpy(), classes=judge.classes)
    show = torch.eye(k).repeat_interleave(8, dim=0)
    write_png(grid, image_grid(to_x(torch.from_numpy(_sample(system, show, torch.Generator().manual_seed(7)))[:, None]), nrow=8),
              atomic=True)
    return {"kid": kid, "kid_sd": kid_sd, **judge.kid_shape, "fid": judge.fid(feats), "n_samples": int(len(images)),
            "class_fidelity": {c: fidelity[c] for c in judge.classes}}


def _fresh(done: dict, m: float, args: argparse.Namespace) -> bool:
    return _key(m) in done and done[_key(m)].get("samples") == [args.samples, args.fidelity_samples, args.kid_subset_size]


def evaluated(run_dir: Path, args: argparse.Namespace) -> bool:
    done = _read_json(run_dir / "eval.json")
    return all(_fresh(done, m, args) for m in args.marks)


def evaluate_run(judge: Judge, run_dir: Path, args: argparse.Namespace) -> dict:
    book = _read_json(run_dir / "marks.json")
    path = run_dir / "eval.json"
    done = _read_json(path)
    for m in args.marks:
        rec = book["marks"][_key(m)]
        if _fresh(done, m, args):
            continue
        r = measure(judge, run_dir / rec["file"], args, run_dir / f"grid_{_key(m)}.png")
        done[_key(m)] = {**rec, **r, "samples": [args.samples, args.fidelity_samples, args.kid_subset_size]}
        _write_json(path, done)
        print(f"  {run_dir.parent.name} / {run_dir.name} at {_key(m)} CPU-min: step {rec['step']}, KID {r['kid']:.4f} "
              f"± {r['kid_sd']:.4f}, FID {r['fid']:.2f}, fidelity "
              + ", ".join(f"{c} {v:.2f}" for c, v in r["class_fidelity"].items() if v is not None), flush=True)
    return done


# ----------------------------------------------------------------------------------------------------
# Gathering.


def _f(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def gather(out: Path, datasets: list[str], recipes: list[str], marks: list[float]) -> dict:
    res: dict[str, Any] = {}
    for d in datasets:
        floor = _read_json(out / d / "floor.json")
        runs = {}
        for r in recipes:
            ev = _read_json(out / d / r / "eval.json")
            rows = [ev[_key(m)] for m in marks if _key(m) in ev]
            if rows:
                runs[r] = rows
        if runs:
            res[d] = {"floor": floor, "runs": runs}
    return res


def curves_md(res: dict, command: str, args: argparse.Namespace) -> str:
    rows = []
    for d, v in res.items():
        for r, marks in v["runs"].items():
            for m in marks:
                rows.append([d, r, _f(m["minute"], "g"), _f(m["cpu_s"] / 60, ".2f"), m["step"],
                             f"{_f(m['kid'])} ± {_f(m['kid_sd'])}", _f(m["fid"], ".2f"),
                             ", ".join(f"{c} {_f(x, '.2f')}" for c, x in m["class_fidelity"].items())])
    frows = [[d, f"{_f(v['floor']['kid'])} ± {_f(v['floor']['kid_sd'])}", _f(v["floor"]["fid"], ".2f"),
              ", ".join(f"{c} {_f(x, '.2f')}" for c, x in v["floor"]["class_fidelity"].items() if c != "overall"),
              v["floor"]["n_real_train"], v["floor"]["n_real_test"], _f(v["floor"].get("judge_test_mean_auc"), ".3f")]
             for d, v in res.items()]
    return "\n".join([
        "# Few-shot sampler recipes at equal CPU time", "", f"Command: `{command}`", "",
        *[f"Data set {d} last measured by: `{v['floor']['command']}`\n" for d, v in res.items()
          if v["floor"].get("command") not in (None, command)],
        f"Clock: {CLOCK}; torch threads {args.threads}, CPU training, no loader workers; marks = the first step at or after "
        "each CPU-minute mark, of one continuous run per (data set, recipe).",
        f"KID: mean ± sd over `evaluate.kid_subsets` subsets of {args.kid_subset_size or 'half the smaller set of'} images "
        "per set (`kid_subsets` / `kid_subset_size` in curves.json). KID and FID: "
        f"{args.samples} samples of the EMA generator, labels drawn in proportion to the "
        "real train split (healthy included), against the real train split, with the data set's real-only judge as the "
        "domain feature extractor. Class fidelity: of "
        f"{args.fidelity_samples} samples conditioned on each class alone, the share with judge p(class) >= 0.5.", "",
        markdown_table(rows, ["data set", "recipe", "mark (CPU-min)", "CPU-min", "steps", "KID ± sd", "FID", "class fidelity"]),
        "", "Floors (real test vs real train; class fidelity = the judge's rate on real test positives):", "",
        markdown_table(frows, ["data set", "KID ± sd", "FID", "class fidelity", "real train", "real test", "judge test AUC"]),
        "", *[f"Note ({d}): {v['floor']['fid_note']}." for d, v in res.items() if v["floor"].get("fid_note")], ""])


def curves_png(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res)
    fig, axes = plt.subplots(2, len(names), figsize=(4.6 * len(names), 6.4), squeeze=False)
    for j, d in enumerate(names):
        for i, (key, label) in enumerate([("kid", "domain KID"), ("fid", "domain FID")]):
            ax = axes[i][j]
            for r, marks in res[d]["runs"].items():
                xs = [m["cpu_s"] / 60 for m in marks]
                ys = [m[key] for m in marks]
                if key == "kid":
                    ax.errorbar(xs, ys, yerr=[m["kid_sd"] for m in marks], marker="o", ms=3, lw=1.2, capsize=2, label=r)
                else:
                    ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=r)
            floor = res[d]["floor"].get(key)
            if floor is not None:
                ax.axhline(floor, color="k", ls="--", lw=0.8, label="floor (real test)")
            ax.set_xlabel("CPU-minutes of training")
            ax.set_ylabel(label)
            ax.set_title(f"{d}: {label} vs real train", fontsize=10)
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {', '.join(RECIPES)}")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {', '.join(DATASETS)}")
    p.add_argument("--minutes", default="2,5,10,20", help="CPU-minute marks of the checkpoints")
    p.add_argument("--samples", type=int, default=500, help="samples for KID / FID per mark")
    p.add_argument("--fidelity-samples", type=int, default=200, help="samples per class for class fidelity")
    p.add_argument("--kid-subset-size", type=int, default=0,
                   help="images per set in each KID subset (0: half the smaller set; capped by evaluate.kid_subset_size)")
    p.add_argument("--judge-epochs", type=int, default=15,
                   help="epochs of the judge (all run; its best validation epoch is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of training and measuring")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run")
    p.add_argument("--save-every", type=float, default=120.0, help="CPU seconds between resume checkpoints")
    p.add_argument("--real-root", type=Path, default=ROOT.parent / "shared" / "data" / "cxr-real",
                   help="the shared real data (kermany)")
    p.add_argument("--override", nargs="*", default=[], help="extra overrides for every run and judge (key=value)")
    p.add_argument("--table-only", action="store_true", help="only gather finished evaluations")
    p.add_argument("--quick", action="store_true",
                   help="sanity mode: 32 px, tiny widths and judge, marks 0.05,0.1 CPU-min, 40 samples")
    args = p.parse_args(argv)
    args.recipes = _choice("recipe", args.recipes, RECIPES)
    args.datasets = _choice("dataset", args.datasets, DATASETS)
    if args.quick:
        if args.minutes == "2,5,10,20":
            args.minutes = "0.05,0.1"
        args.samples, args.fidelity_samples, args.judge_epochs = 40, 16, 1
    args.marks = _minutes(args.minutes)
    if args.samples < 4 or args.fidelity_samples < 1 or args.judge_epochs < 1 or args.threads < 1 or args.kid_subset_size < 0:
        raise UserError("--samples needs >= 4, --fidelity-samples, --judge-epochs and --threads >= 1, --kid-subset-size >= 0")
    args.real_root = args.real_root.expanduser().resolve()
    for d in args.datasets:
        if DATASETS[d].shared and not (args.real_root / "labels.csv").is_file():
            raise UserError(f"data set {d} needs the shared real data, but {args.real_root / 'labels.csv'} is missing: "
                            "pass --real-root DIR (the cxr-real folder) or drop it from --datasets")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file: pass a folder")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    threads = torch.get_num_threads()
    try:
        args = parse(argv)
        torch.set_num_threads(args.threads)
        for d in args.datasets:
            compose(dataset_overrides(d, args))  # every bad override fails before any work
        command = "python benchmarks/quality_fewshot.py " + shlex.join(argv)
        if not args.table_only:
            for d in args.datasets:
                for r in args.recipes:
                    train_run(d, r, args, args.out / d / r)
                floor_path = args.out / d / "floor.json"
                todo = [r for r in args.recipes if not evaluated(args.out / d / r, args)]
                if todo or not floor_path.is_file():  # a rerun of finished work builds no judge
                    judge = make_judge(d, args, args.out / d / "judge")
                    for r in todo:
                        evaluate_run(judge, args.out / d / r, args)
                    note = judge.fid_note or _read_json(floor_path).get("fid_note", "")
                    _write_json(floor_path, {**judge.floor, "fid_note": note, "command": command})
        res = gather(args.out, args.datasets, args.recipes, args.marks)
        if not res:
            raise UserError(f"no finished run in {args.out}: run without --table-only first")
        _write_json(args.out / "curves.json", {"command": command, "clock": CLOCK, "threads": args.threads,
                                               "samples": args.samples, "fidelity_samples": args.fidelity_samples,
                                               "labels": "in proportion to the real train split",
                                               "recipes": {r: RECIPES[r] for r in args.recipes},
                                               "recipe_changes": {r: CHANGES[r] for r in args.recipes},
                                               "datasets": {d: list(DATASETS[d].overrides) for d in args.datasets},
                                               "results": res})
        text = curves_md(res, command, args)
        (args.out / "curves.md").write_text(text)
        curves_png(res, args.out / "curves.png")
        print(text)
        print(f"wrote {args.out / 'curves.md'}, curves.json, curves.png")
        return 0
    except UserError as exc:
        print(f"quality_fewshot: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    raise SystemExit(main())
