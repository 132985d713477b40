"""`augment generate`: pseudo-labeled synthetic X-rays with pixel masks, sharded, resumable,
deterministic.

Sampling: the CGAN samples each requested class in its own stream; the UCGAN samples one shared
stream. Sample ``i`` of a stream draws its noise from a generator seeded by ``(seed, stream, i)``,
so the output does not depend on workers or batch size (every forward pass has exactly
``batch_size`` rows: a short last chunk is padded and the padding discarded). A pseudo-labeller (the
UCGAN's classifier C, or a classifier checkpoint) gives every image ``p(class)``; an image is kept
for class c when ``p(c) >= t``. Kept images go through the translator to ``No Finding``; the
difference map becomes one mask per labelled finding.

Streams are cut into shards of ``shard_size`` samples. A shard is written into ``.shards/<k>.tmp``
and renamed to ``.shards/<k>`` when complete, so a killed run never leaves a half-written shard;
``--resume`` reuses complete shards. The final folder (ARCHITECTURE.md's synthetic format) is
assembled from the shards in order, exactly ``n`` images, then the shards are removed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from augment import runtime
from augment.common import markdown_table, resolve_classes, versions
from augment.config import to_dict
from augment.data.synthetic import write_dataset
from augment.errors import UserError
from augment.jobs.masks import mask_rule
from augment.jobs.shards import SHARDS, shard_name
from augment.models import (classifier_checkpoint, describe, family_checkpoint, find_models, peek, sha256,
                            trained_families)
from augment.progress import progress
from cxrbase import resolve_device

log = logging.getLogger(__name__)


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


def generate(cfg: DictConfig, out: Path) -> dict:
    """The ``augment generate`` stage."""
    g = cfg.generate
    classes = resolve_classes(cfg.classes, allow_no_finding=False)
    n = int(g.n)
    if n <= 0:
        raise UserError(f"--n {n}: ask for at least one image (--n 10000)")
    t = float(g.threshold)
    if not 0 < t < 1:
        raise UserError(f"--threshold {t} is outside (0, 1): use e.g. 0.75")
    if int(g.batch_size) < 1 or int(g.workers) < 1:
        raise UserError("--batch-size and --workers must be >= 1")
    models = find_models(g.models)
    sampler_ckpt = family_checkpoint(models, str(g.sampler))
    if not sampler_ckpt.is_file():
        have = trained_families(models)
        raise UserError(f"no {g.sampler} sampler in {models} (has {', '.join(have) or 'none'}): "
                        f"run `augment train generator={g.sampler}` or pass --sampler")
    # Validation reads the checkpoints' metadata only (memory-mapped); the shard workers load the weights.
    sampler = describe(sampler_ckpt)
    if sampler.kind != "sampler":
        raise UserError(f"{sampler_ckpt} holds a {sampler.kind}, not a sampler: pass --sampler cgan or ucgan")
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
            meta = peek(labeller)
        except UserError as exc:
            raise UserError(f"the pseudo-labeller: {exc}") from None
        if any(c not in meta["classes"] for c in classes):
            raise UserError(f"the pseudo-labeller {labeller} covers {', '.join(meta['classes'])}, not all of "
                            f"{', '.join(classes)}: pass a classifier trained on these classes (--labeller)")
    translator_ckpt = None
    if g.translator and str(g.translator).lower() not in ("none", "null"):
        translator_ckpt = family_checkpoint(models, str(g.translator))
        if not translator_ckpt.is_file():
            raise UserError(f"no {g.translator} translator in {models}: run `augment train translator={g.translator}` "
                            "or pass --translator none for images without masks")
        tinfo = describe(translator_ckpt)
        if tinfo.kind != "translator":
            raise UserError(f"{translator_ckpt} holds a {tinfo.kind}, not a translator: pass --translator "
                            "fixed_point, taggan, branched or none")
        known = tinfo.classes
        missing = [c for c in classes if c not in known]
        if missing:
            raise UserError(f"the {g.translator} translator in {models} was not trained on {', '.join(missing)} (it knows "
                            f"{', '.join(known)}): train it with those classes or pass --translator none")
    existing = [p for p in out.iterdir() if p.name not in ("config.yaml",)] if out.is_dir() else []
    if existing and not (g.resume or g.overwrite):
        raise UserError(f"--out {out} is not empty: pass --resume to finish it or --overwrite to replace it")
    if existing and g.overwrite:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if g.resume and (out / "dataset.json").is_file() and not (out / SHARDS).exists():
        card = json.loads((out / "dataset.json").read_text())
        if card.get("n") == n:
            print(f"{out} is already complete ({n} images)")
            return {"resumed": True, "complete": True, "n": n}
    quotas = plan_quotas(classes, n, bool(g.per_class))
    try:
        device = str(resolve_device(str(g.device)))
    except ValueError as exc:
        raise UserError(f"generate.device: {exc}") from None
    payload = {"out": str(out.resolve()), "sampler_ckpt": str(sampler_ckpt), "translator_ckpt": str(translator_ckpt) if translator_ckpt else None,
               "labeller_ckpt": str(labeller) if labeller else None, "classes": classes, "threshold": t,
               "batch_size": int(g.batch_size), "shard_size": int(g.shard_size), "seed": int(cfg.seed), "device": device,
               "mask": mask_rule(cfg)}
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    for tmp in (out / SHARDS).glob("*.tmp"):  # an interrupted shard is redone from scratch
        shutil.rmtree(tmp, ignore_errors=True)
    streams = classes if conditional else ["*"]
    cap = int(math.ceil(float(g.max_factor) * max(quotas.values()) / int(g.shard_size)))
    t0 = time.perf_counter()
    pool = runtime.StatefulPool("augment.jobs.shards:ShardWorker", payload, int(g.workers),
                                {"name": "inline"} if int(g.workers) == 1 else cfg.runtime)
    next_k = {s: 0 for s in streams}
    warned: list[list[str]] = []
    last_logged = -1
    summaries: dict[str, dict] = {}
    parsed: dict[str, dict] = {}  # shard.json of complete shards, read once
    bar_total = sum(quotas.values())
    print(f"generate: {n} images of {', '.join(classes)} with {g.sampler}"
          f"{' + ' + str(g.translator) + ' masks' if g.translator else ''}, t={t}, into {out}")
    try:
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
                what = (f"pseudo-label quota not reached after {cap * int(g.shard_size)} samples per stream "
                        f"({', '.join(f'{c} {v}' for c, v in short.items())} kept at t={t})")
                if not bool(g.allow_short) or sum(kept.values()) == 0:
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
                m = max(1, min(int(g.workers), math.ceil(need / rate / int(g.shard_size)), cap - next_k[s]))
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
    card = write_dataset(out, out / SHARDS, rows, classes, generator=str(g.sampler), seed=int(cfg.seed), counts=kept,
                         rejected=rejected, threshold=t, config=to_dict(cfg), versions=versions(), checkpoints={
        "sampler": {"family": str(g.sampler), "checkpoint": str(sampler_ckpt), "sha256": sha256(sampler_ckpt)},
        "translator": ({"family": str(g.translator), "checkpoint": str(translator_ckpt), "sha256": sha256(translator_ckpt)}
                       if translator_ckpt else None),
        "labeller": ({"checkpoint": str(labeller), "sha256": sha256(labeller)} if labeller else {"checkpoint": "ucgan C"}),
    }, timings={"seconds": seconds, "images_per_second": n / seconds if seconds else None, **timings})
    rows_md = [[c, quotas[c], kept[c]] for c in classes]
    print(markdown_table(rows_md, ["class", "requested", "kept"]))
    print(f"rejected {rejected} samples below t={t}; {n / seconds:.1f} images/s")
    return {"n": n, "counts": kept, "rejected": rejected, "threshold": t, "out": str(out), "seconds": seconds,
            "images_per_second": n / seconds if seconds else None, "timings": timings, "card": card["checkpoints"]}
