"""`augment generate`: pseudo-labeled synthetic X-rays with pixel masks, sharded, resumable,
deterministic.

Sampling: the CGAN samples each requested class in its own stream; the UCGAN samples one shared
stream. Sample ``i`` of a stream draws its noise from a generator seeded by ``(seed, stream, i)``,
and every forward pass has exactly ``generate.micro_batch`` rows, always the same samples, so the
output does not depend on workers or ``--batch-size`` (:class:`augment.jobs.shards.ShardWorker`). A
pseudo-labeller (the UCGAN's classifier C, or a classifier checkpoint) gives every image, as written
to disk, ``p(class)``; an image is kept for class c when ``p(c) >= t``. Kept images go through the
translator to ``No Finding``; the difference map becomes one mask per labelled finding.

Streams are cut into shards of ``shard_size`` samples. A shard is written into ``.shards/<k>.tmp``
and renamed to ``.shards/<k>`` when complete, so a killed run never leaves a half-written shard;
``--resume`` reuses complete shards of the same run only: ``.shards/plan.json``, written before the
first shard, records what decides the bytes (seed, threshold, classes, n, the models' sha256, the
mask rule, ...) and a resume with other settings is refused, naming them. The final folder
(ARCHITECTURE.md's synthetic format) is assembled from the shards in order, exactly ``n`` images,
then the shards are removed. ``--overwrite`` only empties a folder of augment output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from augment import runtime
from augment.common import markdown_table, resolve_classes, versions
from augment.config import redacted, to_dict
from augment.data.synthetic import write_dataset
from augment.errors import UserError
from augment.jobs.masks import mask_rule
from augment.jobs.shards import SHARDS, shard_name
from augment.models import (classifier_checkpoint, classifier_meta, describe, family_checkpoint, find_models, sha256,
                            trained_families)
from augment.progress import progress
from cxrbase import resolve_device

log = logging.getLogger(__name__)


#: mask sources that need no translator: Grad-CAM / Grad-CAM++ of the pseudo-labeller (``--masks gradcam``)
CAM_SOURCES = ("gradcam", "gradcam_pp")


def plan_quotas(classes: list[str], n: int, per_class: bool) -> dict[str, int]:
    """``--n`` is the total split evenly across classes (the first classes take the remainder), or
    per class with ``--per-class``."""
    if per_class:
        return {c: n for c in classes}
    base, extra = divmod(n, len(classes))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}


def assemble(out: Path, shard_names: list[str], quotas: dict[str, int], classes: list[str],
             conditional: bool, cache: dict[str, dict] | None = None) -> tuple[dict[str, int], int, list[dict]]:
    """Walk shards in order and keep candidates until every quota is full. Returns counts, the number
    of rejected samples and the kept rows (each with its shard). ``cache`` keeps the parsed
    ``shard.json`` of complete shards (they never change), so a polling driver reads each once."""
    kept = {c: 0 for c in classes}
    rejected = 0
    rows: list[dict] = []
    cache = {} if cache is None else cache
    for name in shard_names:
        if name not in cache:
            cache[name] = json.loads((out / SHARDS / name / "shard.json").read_text())
        data = cache[name]
        rejected += data["summary"]["attempts"] - data["summary"]["candidates"]
        for r in data["rows"]:
            if conditional:
                primary = data["summary"]["stream"]
            else:  # the most probable open class among the labelled ones
                open_ = [(p, c) for c, p in zip(classes, r["probs"]) if c in r["labels"] and kept[c] < quotas[c]]
                primary = max(open_)[1] if open_ else None
            if primary is None or kept[primary] >= quotas[primary]:
                rejected += 1
                continue
            kept[primary] += 1
            rows.append({**r, "shard": name, "primary": primary})
    return kept, rejected, rows


PLAN = "plan.json"
PLAN_FORMAT = "augment generate plan v1"
#: How the plan's settings are named to the user (a refused --resume names the differing ones).
PLAN_NAMES = {"seed": "seed (--seed)", "threshold": "threshold (--threshold)", "classes": "classes (--classes)",
              "n": "n (--n)", "per_class": "per_class (--per-class)", "sampler": "sampler (--sampler)",
              "translator": "translator (--translator)", "sampler_sha256": "sampler checkpoint (sha256)",
              "translator_sha256": "translator checkpoint (sha256)", "labeller_sha256": "labeller checkpoint (sha256)",
              "mask": "mask rule (mask.*)", "shard_size": "generate.shard_size", "micro_batch": "generate.micro_batch",
              "device": "device (generate.device)"}


def make_plan(config: dict, classes: list[str], shas: dict[str, str | None], device: str | None) -> dict:
    """What decides the bytes of a generate run (and how its shards are cut), from a plain config: the
    shards of a run are only reused by a run with the same plan. ``device`` is the device type (cpu,
    cuda), ``None`` when unknown (a finished folder's card does not record it)."""
    g, m = config.get("generate") or {}, config.get("mask") or {}
    translator = g.get("translator")
    translator = None if translator is None or str(translator).lower() in ("none", "null") else str(translator)
    return {"seed": config.get("seed"), "threshold": g.get("threshold"), "classes": list(classes), "n": g.get("n"),
            "per_class": g.get("per_class"), "sampler": g.get("sampler"), "translator": translator,
            "sampler_sha256": shas.get("sampler"), "translator_sha256": shas.get("translator"),
            "labeller_sha256": shas.get("labeller"),
            "mask": {k: m.get(k) for k in ("rule", "threshold", "percentile", "min_area", "smooth_sigma")},
            "shard_size": g.get("shard_size"), "micro_batch": g.get("micro_batch"), "device": device}


def plan_differences(old: dict, new: dict) -> list[str]:
    """``name old -> new`` for each setting that differs (``device`` only when both know it)."""
    out = []
    for key, value in new.items():
        before = old.get(key)
        if key == "device" and (before is None or value is None):
            continue
        if before != value:
            show = (lambda v: v[:12] if isinstance(v, str) and key.endswith("sha256") else v)
            out.append(f"{PLAN_NAMES.get(key, key)} {show(before)} -> {show(value)}")
    return out


def card_plan(card: dict) -> dict:
    """The plan of a finished folder, rebuilt from its dataset.json."""
    ck = card.get("checkpoints") or {}
    shas = {k: (ck.get(k) or {}).get("sha256") for k in ("sampler", "translator", "labeller")}
    return make_plan(card.get("config") or {}, card.get("classes") or [], shas, None)


def augment_marker(out: Path) -> str | None:
    """What shows that ``out`` holds augment output (so --overwrite may empty it), or None."""
    card = out / "dataset.json"
    if card.is_file():
        try:
            if str(json.loads(card.read_text()).get("format", "")).startswith("augment synthetic dataset"):
                return "dataset.json"
        except (ValueError, OSError, AttributeError):
            pass
    if (out / SHARDS / PLAN).is_file() or any((out / SHARDS).glob("*/shard.json")):
        return SHARDS
    metrics = out / "metrics.json"
    if metrics.is_file():
        try:
            if "command" in json.loads(metrics.read_text()):
                return "metrics.json"
        except (ValueError, OSError, TypeError):
            pass
    return None


def _int_setting(g: DictConfig, key: str, flag: str, minimum: int) -> int:
    value = g[key]
    if type(value) is not int or value < minimum:
        raise UserError(f"generate.{key}={value!r}{f' ({flag})' if flag else ''} must be a whole number >= {minimum}")
    return value


def _bool_setting(g: DictConfig, key: str) -> bool:
    value = g[key]
    if type(value) is not bool:
        raise UserError(f"generate.{key}={value!r} must be true or false")
    return value


def _float_setting(g: DictConfig, key: str, flag: str) -> float:
    value = g[key]
    if type(value) not in (int, float) or not math.isfinite(value):
        raise UserError(f"generate.{key}={value!r}{f' ({flag})' if flag else ''} must be a number")
    return float(value)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1000 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"


def estimate_bytes(images: int, image_size: int, masks: bool) -> int:
    """Disk an output of ``images`` images needs, generously: a PNG of an s x s uint8 X-ray is at most
    about its raw size (s * s + one filter byte a row + headers), a 0/255 mask compresses to well under
    an eighth of it; plus its labels.csv row and shard record."""
    s = max(1, int(image_size))
    per_image = s * s + s + 512 + (s * s // 8 + 256 if masks else 0)
    return images * per_image


def check_disk(out: Path, images: int, image_size: int, masks: bool) -> None:
    """Refuse up front when the filesystem of ``out`` has less free space than the run needs."""
    already = sum(p.stat().st_size for p in (out / SHARDS).rglob("*") if p.is_file()) if (out / SHARDS).is_dir() else 0
    need = max(0, estimate_bytes(images, image_size, masks) - already)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UserError(f"{images} images of {image_size} px{' with masks' if masks else ''} need about {_human(need)} "
                        f"of disk but {probe} has {_human(free)} free: lower --n, free space or pass another --out")


def generate(cfg: DictConfig, out: Path) -> dict:
    """The ``augment generate`` stage."""
    g = cfg.generate
    classes = resolve_classes(cfg.classes, allow_no_finding=False)
    # every numeric setting first: nothing is read, loaded or written before they are valid
    if type(g.n) is not int:
        raise UserError(f"generate.n={g.n!r} (--n) must be a whole number >= 1")
    n = g.n
    if n <= 0:
        raise UserError(f"--n {n}: ask for at least one image (--n 10000)")
    t = _float_setting(g, "threshold", "--threshold")
    if not 0 < t < 1:
        raise UserError(f"--threshold {t} is outside (0, 1): use e.g. 0.75")
    batch_size = _int_setting(g, "batch_size", "--batch-size", 1)
    workers = _int_setting(g, "workers", "--workers", 1)
    shard_size = _int_setting(g, "shard_size", "", 1)
    micro_batch = _int_setting(g, "micro_batch", "", 1)
    max_factor = _float_setting(g, "max_factor", "")
    if max_factor <= 0:
        raise UserError(f"generate.max_factor={max_factor} must be > 0 (e.g. 20)")
    per_class, resume, overwrite, allow_short = (_bool_setting(g, k)
                                                 for k in ("per_class", "resume", "overwrite", "allow_short"))
    if type(cfg.seed) is not int:
        raise UserError(f"seed={cfg.seed!r} (--seed) must be a whole number")
    models = find_models(g.models)
    if not g.models:  # runs/train/latest may be shared by several users of this folder: say which run it is
        print(f"generate: models of {models} (runs/train/latest; pass --models to choose a train run)")
    sampler_ckpt = family_checkpoint(models, str(g.sampler))
    if not sampler_ckpt.is_file():
        have = trained_families(models)
        raise UserError(f"no {g.sampler} sampler in {models} (has {', '.join(have) or 'none'}): "
                        f"run `augment train generator={g.sampler}` or pass --sampler")
    # Validation reads the checkpoints' metadata only (memory-mapped); the shard workers load the weights.
    sampler = describe(sampler_ckpt, kind="sampler", family=str(g.sampler))
    missing = [c for c in classes if c not in sampler.classes]
    if missing:
        raise UserError(f"the {g.sampler} sampler in {models} does not cover {', '.join(missing)} (it covers "
                        f"{', '.join(sampler.findings)}): run `augment train generator={g.sampler} --classes {','.join(classes)}`")
    conditional = sampler.conditional
    labeller = None
    if g.labeller and g.labeller != "auto":
        labeller = Path(str(g.labeller))
    elif conditional:
        labeller = classifier_checkpoint(models)
        if labeller is None:
            raise UserError(f"no pseudo-labeller for the cgan sampler in {models}: train one with `augment train` "
                            "(it trains the classifier too) or pass --labeller PATH (a checkpoint of augment classify)")
    if labeller is not None:
        try:
            meta = classifier_meta(labeller)
        except UserError as exc:
            raise UserError(f"the pseudo-labeller: {exc}") from None
        if any(c not in meta["classes"] for c in classes):
            raise UserError(f"the pseudo-labeller {labeller} covers {', '.join(meta['classes'])}, not all of "
                            f"{', '.join(classes)}: pass a classifier trained on these classes (--labeller)")
    translator_ckpt = None
    cam = str(g.translator) if str(g.translator) in CAM_SOURCES else None  # the pseudo-labeller's maps, no translator
    if cam is None and g.translator and str(g.translator).lower() not in ("none", "null"):
        translator_ckpt = family_checkpoint(models, str(g.translator))
        if not translator_ckpt.is_file():
            raise UserError(f"no {g.translator} translator in {models}: run `augment train translator={g.translator}` "
                            "or pass --translator none for images without masks")
        known = describe(translator_ckpt, kind="translator", family=str(g.translator)).classes
        missing = [c for c in classes if c not in known]
        if missing:
            raise UserError(f"the {g.translator} translator in {models} was not trained on {', '.join(missing)} (it knows "
                            f"{', '.join(known)}): train it with those classes or pass --translator none")
    try:
        device = str(resolve_device(str(g.device)))
    except ValueError as exc:
        raise UserError(f"generate.device: {exc}") from None
    shas = {"sampler": sha256(sampler_ckpt), "translator": sha256(translator_ckpt) if translator_ckpt else None,
            "labeller": sha256(labeller) if labeller else None}
    plan = {"format": PLAN_FORMAT, **make_plan(to_dict(cfg), classes, shas, torch.device(device).type)}
    # --out: empty (config.yaml aside), or augment output that --resume continues / --overwrite replaces
    existing = [p for p in out.iterdir() if p.name not in ("config.yaml",)] if out.is_dir() else []
    if existing and not (resume or overwrite):
        raise UserError(f"--out {out} is not empty: pass --resume to finish it or --overwrite to replace it")
    if existing and augment_marker(out) is None:
        raise UserError(f"--out {out} holds files that are not augment output (no dataset.json, .shards or metrics.json "
                        f"of augment): --{'overwrite' if overwrite else 'resume'} only takes an augment output folder; "
                        "pass an empty or new --out")
    if existing and resume and not overwrite:
        old = None
        if (out / SHARDS / PLAN).is_file():
            try:
                old = json.loads((out / SHARDS / PLAN).read_text())
            except ValueError:
                old = None
        elif any((out / SHARDS).glob("*/shard.json")):
            old = None
        elif (out / "dataset.json").is_file():
            try:
                old = {**card_plan(json.loads((out / "dataset.json").read_text())), "format": PLAN_FORMAT}
            except (ValueError, AttributeError):
                old = None
        else:
            old = plan  # nothing of a previous run to keep (e.g. only a metrics.json)
        if not isinstance(old, dict) or old.get("format") != PLAN_FORMAT:
            raise UserError(f"--resume: cannot tell which settings started {out} (no readable {SHARDS}/{PLAN}; "
                            "written by an older augment?): pass --overwrite to start again")
        diff = plan_differences(old, plan)
        if diff:
            raise UserError(f"--resume: {out} was started with other settings ({'; '.join(diff)}): resume with the "
                            "same settings, or pass --overwrite to start again")
        if (out / "dataset.json").is_file() and not (out / SHARDS).exists():
            print(f"{out} is already complete ({n if not per_class else n * len(classes)} images requested)")
            return {"resumed": True, "complete": True, "n": json.loads((out / "dataset.json").read_text()).get("n")}
    quotas = plan_quotas(classes, n, per_class)
    check_disk(out, sum(quotas.values()), sampler.image_size, translator_ckpt is not None or cam is not None)
    payload = {"out": str(out.resolve()), "sampler_ckpt": str(sampler_ckpt), "translator_ckpt": str(translator_ckpt) if translator_ckpt else None,
               "labeller_ckpt": str(labeller) if labeller else None, "classes": classes, "threshold": t,
               "batch_size": batch_size, "micro_batch": micro_batch, "shard_size": shard_size, "seed": int(cfg.seed),
               "device": device, "mask": mask_rule(cfg), "cam": cam}
    streams = classes if conditional else ["*"]
    cap = int(math.ceil(max_factor * max(quotas.values()) / shard_size))
    t0 = time.perf_counter()
    # the workers load the models before anything in --out is replaced or written
    pool = runtime.StatefulPool("augment.jobs.shards:ShardWorker", payload, workers,
                                {"name": "inline"} if workers == 1 else cfg.runtime)
    try:
        if existing and overwrite:
            for p in existing:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
        if not (out / SHARDS / PLAN).is_file():  # before the first shard, atomically
            tmp_plan = out / SHARDS / f".{PLAN}.tmp"
            tmp_plan.write_text(json.dumps(plan, indent=2) + "\n")
            os.replace(tmp_plan, out / SHARDS / PLAN)
        for tmp in (out / SHARDS).glob("*.tmp"):  # an interrupted shard is redone from scratch
            shutil.rmtree(tmp, ignore_errors=True)
        next_k = {s: 0 for s in streams}
        warned: list[list[str]] = []
        last_logged = -1
        summaries: dict[str, dict] = {}
        parsed: dict[str, dict] = {}  # shard.json of complete shards, read once
        bar_total = sum(quotas.values())
        print(f"generate: {n} images of {', '.join(classes)} with {g.sampler}"
              f"{' + ' + str(g.translator) + ' masks' if translator_ckpt or cam else ''}, t={t}, into {out}")
        while True:
            order = [shard_name(s, k) for s in streams for k in range(next_k[s])]
            kept, rejected, _ = assemble(out, order, quotas, classes, conditional, parsed)
            todo_streams = [s for s in streams if (kept[s] < quotas[s] if conditional else any(kept[c] < quotas[c] for c in classes))]
            if sum(kept.values()) != last_logged:  # one line per change, not per polling round
                last_logged = sum(kept.values())
                log.info("generate: %d / %d images kept", last_logged, bar_total)
            if not todo_streams:
                break
            over = [s for s in todo_streams if next_k[s] >= cap]
            if over:
                short = {c: f"{kept[c]}/{quotas[c]}" for c in classes if kept[c] < quotas[c]}
                what = (f"pseudo-label quota not reached after {cap * shard_size} samples per stream "
                        f"({', '.join(f'{c} {v}' for c, v in short.items())} kept at t={t})")
                if not allow_short or sum(kept.values()) == 0:
                    raise UserError(f"{what}: lower --threshold, train the models longer, raise generate.max_factor"
                                    + ("" if sum(kept.values()) == 0 else ", or pass --allow-short to keep what was found"))
                if over not in warned:
                    log.warning("generate: %s; --allow-short: writing the images found", what)
                    warned.append(over)
                todo_streams = [s for s in todo_streams if s not in over]
                if not todo_streams:
                    break
            specs = []
            for s in todo_streams:
                # enough shards for the missing images at the acceptance rate seen so far (at least one, at most workers)
                need = (quotas[s] - kept[s]) if conditional else max(quotas[c] - kept[c] for c in classes)
                seen = [summaries[o] for o in order if o in summaries and summaries[o]["stream"] == s]
                rate = max(1e-3, sum(x["candidates"] for x in seen) / max(1, sum(x["attempts"] for x in seen))) if seen else 1.0
                m = max(1, min(workers, math.ceil(need / rate / shard_size), cap - next_k[s]))
                for _ in range(m):
                    name = shard_name(s, next_k[s])
                    specs.append({"stream": s, "k": next_k[s], "name": name})
                    next_k[s] += 1
            for res in progress(pool.map(specs), total=len(specs), desc="shards", enabled=bool(cfg.progress)):
                summaries[res["name"]] = res
    finally:
        pool.close()
    order = [shard_name(s, k) for s in streams for k in range(next_k[s])]
    kept, rejected, rows = assemble(out, order, quotas, classes, conditional, parsed)
    seconds = time.perf_counter() - t0
    n = sum(kept.values())  # fewer than asked only with --allow-short
    timings = {k: sum(summaries[o]["timings"][k] for o in order) for k in ("sample", "label", "translate", "write")}
    # the card holds the config with its secrets masked (a database or Ray password in a URL)
    card = write_dataset(out, out / SHARDS, rows, classes, generator=str(g.sampler), seed=int(cfg.seed), counts=kept,
                         rejected=rejected, threshold=t, config=redacted(to_dict(cfg)), versions=versions(), checkpoints={
        "sampler": {"family": str(g.sampler), "checkpoint": str(sampler_ckpt), "sha256": shas["sampler"]},
        "translator": ({"family": str(g.translator), "checkpoint": str(translator_ckpt), "sha256": shas["translator"]}
                       if translator_ckpt else {"family": cam, "checkpoint": "the pseudo-labeller's CAMs"} if cam else None),
        "labeller": ({"checkpoint": str(labeller), "sha256": shas["labeller"]} if labeller else {"checkpoint": "ucgan C"}),
    }, timings={"seconds": seconds, "images_per_second": n / seconds if seconds else None, **timings})
    rows_md = [[c, quotas[c], kept[c]] for c in classes]
    print(markdown_table(rows_md, ["class", "requested", "kept"]))
    print(f"rejected {rejected} samples below t={t}; {n / seconds:.1f} images/s")
    return {"n": n, "counts": kept, "rejected": rejected, "threshold": t, "out": str(out), "seconds": seconds,
            "images_per_second": n / seconds if seconds else None, "timings": timings, "card": card["checkpoints"]}
