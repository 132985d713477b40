"""The ``augment`` command: friendly flags -> Hydra overrides -> a stage function.

``augment generate --classes edema,hernia --n 10000`` is the same run as
``augment generate classes=[edema,hernia] generate.n=10000``: each flag maps to one config key
(defaults live only in the YAML), and raw ``key=value`` overrides given after the flags win.
Every command writes ``metrics.json`` and ``config.yaml`` to its output folder
(``--out``, default ``runs/<command>/<timestamp>``). Bad input: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import logging
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from augment import __version__
from augment.errors import Interrupted, UserError

# The stages, Hydra, torch and Ray are imported when a command runs, not here: `augment --help` and a
# mistyped flag answer at once instead of after seconds of imports.

log = logging.getLogger("augment")


@dataclass
class Command:
    """One subcommand: its stage function (``module:function``) and its flags."""

    name: str
    target: str
    help: str
    flags: list[tuple[tuple[str, ...], dict, str | None]] = field(default_factory=list)  # (names, argparse kw, override template)
    wants_overrides: bool = False  # the stage re-composes per model (e.g. generator=cgan,ucgan)
    keep_partial: bool = False  # on an error, keep an --out that holds more than config.yaml (a rerun resumes)
    resume_hint: str = "the same command resumes"  # how to finish kept work
    keep_on_error: bool = True  # keep_partial on a refusal too (False: only an interrupted run keeps its work)


CLASSES_FLAG = (("--classes",), {"help": "comma-separated classes, case-insensitive, aliases allowed (edema,hernia)"}, "classes=[{}]")

COMMANDS: dict[str, Command] = {
    "data show": Command("data show", "augment.stages.data:show",
                         "per-class counts per split and a sample grid PNG with masks overlaid", [CLASSES_FLAG]),
    "data prepare": Command("data prepare", "augment.stages.data:prepare", "decode and resize a data source into the cache"),
    "classify": Command("classify", "augment.stages.classify:classify",
                        "train timm classifiers on real (+ synthetic) data; per-class test AUC over seeds", [
        CLASSES_FLAG,
        (("--synthetic",), {"nargs": "+", "metavar": "DIR", "help": "synthetic dataset folder(s) to mix with the real data"},
         "classify.synthetic=[{}]"),
        (("--seeds",), {"help": "comma-separated seeds (0,1,2): one model each, mean and spread reported"}, "classify.seeds=[{}]"),
        (("--threshold",), {"type": float, "help": "pseudo-label threshold t on the synthetic p_<class> columns"},
         "classify.threshold={}"),
        (("--arms",), {"help": "comma-separated arms at an equal step budget: real, classic, oversample, synthetic, "
                               "synthetic+classic (one table with paired 95 %% intervals)"}, "classify.arms=[{}]"),
        (("--curve",), {"help": "low-data curve: real positives per class at each point (20,40,100,all); with --arms"},
         "classify.curve=[{}]"),
        (("--checkpoint",), {"metavar": "RUN_OR_PT", "help": "score a trained model (a classify run folder: every seed; "
                                                             "or one best.pt) on data=... without training"},
         "classify.checkpoint='{}'"),
    ]),
    "train": Command("train", "augment.stages.train:train",
                     "train samplers (generator=cgan,ucgan) and translators (translator=fixed_point,taggan,branched) "
                     "in parallel Ray actors", [CLASSES_FLAG], wants_overrides=True, keep_partial=True),
    "generate": Command("generate", "augment.stages.generate:generate",
                        "write pseudo-labeled synthetic X-rays with pixel masks (images/, masks/, labels.csv, dataset.json)", [
        (("--classes",), {"help": "classes to generate, comma-separated, case-insensitive (edema,hernia)"}, "classes=[{}]"),
        (("--n",), {"type": int, "help": "total number of kept images, split evenly across the classes"}, "generate.n={}"),
        (("--per-class",), {"action": "store_true", "help": "make --n the number of images of EACH class"}, "generate.per_class=true"),
        (("--models",), {"help": "a train run folder (default: runs/train/latest)"}, "generate.models='{}'"),
        (("--seed",), {"type": int, "help": "run seed; sample i of a class draws its noise from (seed, class, i)"}, "seed={}"),
        (("--batch-size",), {"type": int, "help": "samples handled per step (the output does not depend on it; generate.micro_batch sets the forward passes)"}, "generate.batch_size={}"),
        (("--workers",), {"type": int, "help": "parallel shard workers (Ray actors, one GPU each where present)"}, "generate.workers={}"),
        (("--threshold",), {"type": float, "help": "pseudo-label threshold t in (0, 1): keep an image for class c when p(c) >= t"},
         "generate.threshold={}"),
        (("--sampler",), {"choices": ["cgan", "ucgan"], "help": "cgan samples each class; ucgan samples freely and pseudo-labels"},
         "generate.sampler={}"),
        (("--translator", "--masks"), {"dest": "translator", "help": "mask source: a translator family (fixed_point, taggan, "
                                       "branched), gradcam or gradcam_pp (the pseudo-labeller's maps, no translator), "
                                       "or 'none' for no masks"},
         "generate.translator={}"),
        (("--labeller",), {"help": "classifier checkpoint that pseudo-labels the images (default: UCGAN's C or the trained one)"},
         "generate.labeller='{}'"),
        (("--resume",), {"action": "store_true", "help": "finish an interrupted run in --out (complete shards are kept)"},
         "generate.resume=true"),
        (("--overwrite",), {"action": "store_true", "help": "replace a non-empty --out"}, "generate.overwrite=true"),
        (("--allow-short",), {"action": "store_true", "help": "write the images found when a class cannot fill its quota "
                                                               "at this threshold (default: refuse)"}, "generate.allow_short=true"),
    ], keep_partial=True, keep_on_error=False, resume_hint="the same command with --resume finishes it"),
    "evaluate": Command("evaluate", "augment.stages.evaluate:evaluate",
                        "mask metrics of the trained translators; FID/KID/IS/PR/class fidelity of --synthetic, with floors", [
        CLASSES_FLAG,
        (("--synthetic",), {"metavar": "DIR", "help": "a synthetic dataset folder (augment generate output)"},
         "evaluate.synthetic='{}'"),
        (("--models",), {"help": "a train run folder (default: runs/train/latest)"}, "evaluate.models='{}'"),
        (("--localisation",), {"help": "real lesion sets to score the mask sources on, comma-separated: nih_bbox, "
                                         "covidqu_infection, jsrt_nodules (random, Grad-CAM, Grad-CAM++ and the translators)"},
         "evaluate.localisation=[{}]"),
    ]),
    "search": Command("search", "augment.search:search",
                      "Optuna search (search=pseudo_label|ucgan_weights|translator_weights): trials share one study; "
                      "writes best.yaml (apply with --from-search), metrics.json and plots", [
        CLASSES_FLAG,
        (("--trials",), {"type": int, "help": "trials to run now; rerunning with the same --out continues the study"},
         "search.n_trials={}"),
        (("--workers",), {"type": int, "help": "trial loops at once (Ray actors sharing the study, one GPU each where present)"},
         "search.workers={}"),
        (("--storage",), {"help": "SQLAlchemy URL of the study database (default sqlite:///<out>/study.db; "
                                  "postgresql://... for many machines)"}, "search.storage='{}'"),
        (("--study",), {"help": "study name (default: the space name)"}, "search.study='{}'"),
        (("--timeout",), {"type": float, "help": "seconds after which no new trial is started"}, "search.timeout={}"),
    ], wants_overrides=True, keep_partial=True),
    "run": Command("run", "augment.pipeline:run",
                   "the whole flow: train -> baseline -> generate -> augmented -> evaluate -> report (resumable)", [
        (("--from",), {"dest": "from_step", "metavar": "STEP",
                       "help": "rerun from this step: train, baseline, generate, augmented, evaluate or report"},
         "run.from_step={}"),
    ], wants_overrides=True, keep_partial=True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="augment",
        description="Synthetic data augmentation for chest X-ray classifiers. Every command also takes "
        "Hydra overrides (key=value, group=option), e.g. data=folder data.root=/data/cxr data.image_size=128.",
        epilog="Data sources: data=phantom (default, procedural), folder, nih, chexpert, medmnist. "
        "Runtime: runtime=local (Ray on this machine), cluster, inline (no Ray).",
    )
    parser.add_argument("--version", action="version", version=f"augment {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS.values():
        words = cmd.name.split()
        if len(words) == 2:
            if words[0] not in groups:
                gp = sub.add_parser(words[0], help=f"{words[0]} commands ({', '.join(c.name.split()[1] for c in COMMANDS.values() if c.name.startswith(words[0] + ' '))})")
                groups[words[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            p = groups[words[0]].add_parser(words[1], help=cmd.help, description=cmd.help)
        else:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--out", help="output folder (default runs/<command>/<timestamp>)")
        p.add_argument("--from-search", metavar="BEST_YAML",
                       help="apply the best parameters of an `augment search` run (its best.yaml); "
                            "flags and key=value overrides given here win")
        for names, kw, _ in cmd.flags:
            p.add_argument(*names, **kw)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides")
        p.set_defaults(_command=cmd.name)
    return parser


def to_overrides(ns: argparse.Namespace, cmd: Command) -> list[str]:
    """Flags given on the command line as Hydra overrides; raw overrides come last, so they win."""
    out: list[str] = []
    if getattr(ns, "from_search", None):
        from augment.search import read_best

        out += read_best(ns.from_search)
    for names, kw, template in cmd.flags:
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        value = getattr(ns, dest, None)
        if template is None or value is None or value is False:
            continue
        if value is True:
            out.append(template)
            continue
        if isinstance(value, list):  # paths may hold characters Hydra's grammar reserves: quote them
            value = ",".join("'" + str(v).replace("'", "\\'") + "'" for v in value)
        out.append(template.format(value))
    if ns.out:
        out.append(f"out={ns.out}")
    bad = [o for o in ns.overrides if "=" not in o]
    if bad:
        raise UserError(f"unexpected argument '{bad[0]}': overrides are key=value (see augment {cmd.name} --help)")
    return out + list(ns.overrides)


def output_dir(configured: str | None, command: str) -> Path:
    """``--out`` or ``runs/<command>/<timestamp>`` (a fresh folder)."""
    if configured:
        path = Path(configured)
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / command.replace(" ", "-") / stamp
        k = 1
        while path.exists():
            path = Path("runs") / command.replace(" ", "-") / f"{stamp}-{k}"
            k += 1
    return path


def resolve_target(target: str) -> Callable:
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def _prepare_out(out: Path) -> bool:
    """Create ``--out`` (returns whether it was created here); a path that cannot be a folder is one line."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder path (it is created if missing)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out} ({exc.strerror or type(exc).__name__}): pass a writable folder") from None
    return created


def run_command(name: str, overrides: Sequence[str]) -> dict:
    """Compose the config, run the stage, write metrics.json and config.yaml; return the metrics.

    A refused or interrupted command leaves no trace: a folder it created is removed (unless it holds
    finished work to resume), and an existing run's ``config.yaml`` is put back as it was.
    """
    from augment.config import compose, save_config
    from augment.common import write_json
    cmd = COMMANDS[name]
    family_free = [o for o in overrides if not (o.split("=", 1)[0] in ("generator", "translator") and "," in o)]
    cfg = compose(family_free)
    if name == "run" and not cfg.out:  # a stable folder, so running the same command again resumes
        from augment.pipeline import default_out

        out = Path(default_out(cfg))
    else:
        out = output_dir(cfg.out, name)
    created = _prepare_out(out)
    config_path = out / "config.yaml"
    previous = config_path.read_bytes() if config_path.is_file() else None
    try:
        try:
            save_config(cfg, config_path)
        except OSError as exc:
            raise UserError(f"cannot write {config_path} ({exc.strerror or type(exc).__name__}): "
                            "pass a writable folder as --out") from None
        stage = resolve_target(cmd.target)
        metrics = stage(cfg, out, overrides=list(overrides)) if cmd.wants_overrides else stage(cfg, out)
    except (UserError, KeyboardInterrupt) as exc:
        keep = cmd.keep_partial and (cmd.keep_on_error or not isinstance(exc, UserError) or isinstance(exc, Interrupted))
        partial = keep and out.is_dir() and any(p.name != "config.yaml" for p in out.iterdir())
        if created and not partial:  # refused or interrupted before anything useful: leave no trace
            shutil.rmtree(out, ignore_errors=True)
        elif previous is not None and not isinstance(exc, Interrupted):
            config_path.write_bytes(previous)  # a refused command does not rewrite the run's config.yaml
        if partial and type(exc) is KeyboardInterrupt:  # say where the finished work is and how to finish it
            raise Interrupted(f"finished work is kept in {out}: {cmd.resume_hint}") from None
        if isinstance(exc, Interrupted) and exc.metrics is not None and out.is_dir():
            write_json(out / "metrics.json", {"command": name, **exc.metrics})
        elif partial and isinstance(exc, UserError) and exc.resumable and not isinstance(exc, Interrupted):
            kept = UserError(f"{exc} (finished work is kept in {out}: {cmd.resume_hint})")
            kept.exit_code = exc.exit_code
            raise kept from None
        raise
    metrics = {"command": name, **(metrics or {})}
    write_json(out / "metrics.json", metrics)
    print(f"wrote {out / 'metrics.json'} and {out / 'config.yaml'}")
    return metrics


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    logging.captureWarnings(True)  # library warnings (small-sample FID, ...) as one log line each
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    # overrides may stand after the flags too (argparse stops its positional list at the first flag)
    stray = [r for r in rest if r.startswith("-") or "=" not in r]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        ns.overrides = [*getattr(ns, "overrides", []), *rest]
    if not getattr(ns, "_command", None):
        parser.print_help()
        return 2
    _setup_logging()
    previous = _terminate_as_interrupt()
    try:
        run_command(ns._command, to_overrides(ns, COMMANDS[ns._command]))
    except Interrupted as exc:
        print(f"augment: interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"augment: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("augment: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _terminate_as_interrupt() -> object | None:
    """``kill PID`` (SIGTERM) is handled as Ctrl-C: the same clean-up runs (half-written folders removed,
    a search's running trials marked FAIL, exit 130). Returns the previous handler (None off the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread (an embedding program): leave its handling alone
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
