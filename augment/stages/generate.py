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

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from augment import runtime
from augment.config import to_dict
from augment.data.labels import NO_FINDING, finding_string
from augment.errors import UserError
from augment.progress import progress
from augment.stages.common import markdown_table, resolve_classes, versions, write_json

log = logging.getLogger(__name__)

SHARDS = ".shards"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images B x 1 x H x W -> uint8 B x H x W."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()[:, 0]


def write_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def stream_id(stream: str) -> int:
    """A stable integer for a stream name (a class, or ``*`` for the shared UCGAN stream)."""
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")


def _classifier_checkpoint(models: Path) -> Path | None:
    hits = sorted((models / "models" / "classifier").glob("**/best.pt"))
    return hits[0] if hits else None


class ShardWorker:
    """Loads the models once; ``run(spec)`` writes one complete shard. Ray makes it an actor."""

    def __init__(self, payload: dict) -> None:
        from augment.stages.train import load_model

        self.p = payload
        self.device = torch.device(payload["device"])
        self.sampler, ck = load_model(Path(payload["sampler_ckpt"]))
        self.sampler.to(self.device)
        self.conditional = not str(ck["model_cfg"]["_target_"]).endswith("UCGAN")
        self.sampler_classes = list(ck["classes"])
        self.translator = None
        if payload.get("translator_ckpt"):
            self.translator, tk = load_model(Path(payload["translator_ckpt"]))
            self.translator.to(self.device)
            self.translator_classes = list(tk["classes"])
        self.labeller = None
        if payload.get("labeller_ckpt"):
            from classifiers.model import load_classifier

            self.labeller, meta = load_classifier(payload["labeller_ckpt"], map_location=self.device)
            self.labeller_classes = list(meta["classes"])
        self.classes = payload["classes"]

    def pseudo_probs(self, x: torch.Tensor) -> torch.Tensor:
        """p(class) over the requested classes, B x C."""
        if self.labeller is not None:
            probs = torch.sigmoid(self.labeller(x).float())
            cols = [self.labeller_classes.index(c) for c in self.classes]
        else:
            probs = self.sampler.classify(x)
            cols = [self.sampler_classes.index(c) for c in self.classes]
        return probs[:, cols]

    @torch.no_grad()
    def run(self, spec: dict) -> dict:
        from generators.masks import per_finding_masks

        p = self.p
        stream, k, size = spec["stream"], int(spec["k"]), int(p["shard_size"])
        final = Path(p["out"]) / SHARDS / spec["name"]
        if final.is_dir():
            return json.loads((final / "shard.json").read_text())["summary"]
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        t, bs, seed = float(p["threshold"]), int(p["batch_size"]), int(p["seed"])
        from generators.train import derive_seed

        sid = stream_id(stream)
        rows: list[dict] = []
        timings = {"sample": 0.0, "label": 0.0, "translate": 0.0, "write": 0.0}
        try:
            for start in range(k * size, (k + 1) * size, bs):
                idx = list(range(start, min(start + bs, (k + 1) * size)))
                pad = bs - len(idx)  # every forward pass has batch_size rows: results never depend on the chunking
                t0 = time.perf_counter()
                z = torch.stack([torch.randn(self.sampler.z_dim, generator=torch.Generator().manual_seed(
                    derive_seed(seed, sid, i))) for i in idx + [idx[-1]] * pad]).to(self.device)
                if self.conditional:
                    y = torch.zeros(len(z), len(self.sampler_classes), device=self.device)
                    y[:, self.sampler_classes.index(stream)] = 1
                    x = self.sampler.G(z, y)
                else:
                    x = self.sampler.G(z)
                t1 = time.perf_counter()
                probs = self.pseudo_probs(x)
                t2 = time.perf_counter()
                labels = (probs >= t).float()
                if self.conditional:  # a CGAN image is a candidate for its own class only
                    keep = labels[:, self.classes.index(stream)] == 1
                else:
                    keep = labels.sum(1) > 0
                keep[len(idx):] = False
                masks: dict[str, torch.Tensor] = {}
                if self.translator is not None and keep.any():
                    full = torch.zeros(len(x), len(self.translator_classes), device=self.device)
                    for j, c in enumerate(self.classes):
                        if c in self.translator_classes:
                            full[:, self.translator_classes.index(c)] = labels[:, j]
                    full[~keep] = 0
                    sel = torch.nonzero(keep).flatten()
                    m = per_finding_masks(self.translator, x[sel], full[sel], self.translator_classes, **p["mask"])
                    masks = {c: torch.zeros(len(x), 1, *x.shape[2:], device=self.device).index_copy_(0, sel, v.float())
                             for c, v in m.items()}
                t3 = time.perf_counter()
                imgs = to_uint8(x)
                for j, i in enumerate(idx):
                    if not keep[j]:
                        continue
                    sample_id = f"{stream.lower() if stream != '*' else 'u'}-{i:08d}"
                    write_png(tmp / "images" / f"{sample_id}.png", imgs[j])
                    names = [c for c, v in zip(self.classes, labels[j].tolist()) if v == 1]
                    mask_files = []
                    for c in names:
                        if c in masks:
                            mf = f"masks/{sample_id}_{c}.png"
                            write_png(tmp / mf, (masks[c][j, 0].cpu().numpy() > 0.5).astype(np.uint8) * 255)
                            mask_files.append(mf)
                    rows.append({"id": sample_id, "attempt": i, "labels": names, "probs": probs[j].tolist(),
                                 "masks": mask_files})
                timings["sample"] += t1 - t0
                timings["label"] += t2 - t1
                timings["translate"] += t3 - t2
                timings["write"] += time.perf_counter() - t3
            summary = {"name": spec["name"], "stream": stream, "k": k, "attempts": size, "candidates": len(rows),
                       "timings": timings}
            (tmp / "shard.json").write_text(json.dumps({"summary": summary, "rows": rows}))
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise UserError(f"disk full while writing {final.parent}: free space or pass another --out "
                                "(--resume continues from the complete shards)") from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return summary


def plan_quotas(classes: list[str], n: int, per_class: bool) -> dict[str, int]:
    """``--n`` is the total split evenly across classes (the first classes take the remainder), or
    per class with ``--per-class``."""
    if per_class:
        return {c: n for c in classes}
    base, extra = divmod(n, len(classes))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(classes)}


def shard_name(stream: str, k: int) -> str:
    return f"{stream.lower() if stream != '*' else 'u'}-{k:05d}"


def assemble(out: Path, shard_names: list[str], quotas: dict[str, int], classes: list[str],
             conditional: bool) -> tuple[dict[str, int], int, list[dict]]:
    """Walk shards in order and keep candidates until every quota is full. Returns counts, the number
    of rejected samples and the kept rows (each with its shard)."""
    kept = {c: 0 for c in classes}
    rejected = 0
    rows: list[dict] = []
    for name in shard_names:
        data = json.loads((out / SHARDS / name / "shard.json").read_text())
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
    from augment.stages.train import find_models

    models = find_models(g.models)
    sampler_ckpt = models / "models" / str(g.sampler) / "checkpoint.pt"
    if not sampler_ckpt.is_file():
        have = sorted(p.parent.name for p in (models / "models").glob("*/checkpoint.pt"))
        raise UserError(f"no {g.sampler} sampler in {models} (has {', '.join(have) or 'none'}): "
                        f"run `augment train generator={g.sampler}` or pass --sampler")
    from generators.checkpoint import load_checkpoint

    sck = load_checkpoint(sampler_ckpt)
    missing = [c for c in classes if c not in sck["classes"]]
    if missing:
        covered = ", ".join(c for c in sck["classes"] if c != NO_FINDING)
        raise UserError(f"the {g.sampler} sampler in {models} does not cover {', '.join(missing)} (it covers {covered}): "
                        f"run `augment train generator={g.sampler} --classes {','.join(classes)}`")
    conditional = not str(sck["model_cfg"]["_target_"]).endswith("UCGAN")
    labeller = None
    if g.labeller and g.labeller != "auto":
        labeller = Path(str(g.labeller))
    elif conditional:
        labeller = _classifier_checkpoint(models)
        if labeller is None:
            raise UserError(f"no pseudo-labeller for the cgan sampler in {models}: train one with `augment train` "
                            "(it trains the classifier too) or pass --labeller PATH (a checkpoint of augment classify)")
    if labeller is not None:
        from classifiers.model import load_classifier

        try:
            _, meta = load_classifier(labeller)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise UserError(f"cannot load the pseudo-labeller {labeller}: {exc}") from None
        if any(c not in meta["classes"] for c in classes):
            raise UserError(f"the pseudo-labeller {labeller} covers {', '.join(meta['classes'])}, not all of "
                            f"{', '.join(classes)}: pass a classifier trained on these classes (--labeller)")
    translator_ckpt = None
    if g.translator and str(g.translator).lower() not in ("none", "null"):
        translator_ckpt = models / "models" / str(g.translator) / "checkpoint.pt"
        if not translator_ckpt.is_file():
            raise UserError(f"no {g.translator} translator in {models}: run `augment train translator={g.translator}` "
                            "or pass --translator none for images without masks")
        known = load_checkpoint(translator_ckpt).get("classes") or []
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
    device = "cuda" if torch.cuda.is_available() and g.device == "auto" else ("cpu" if g.device == "auto" else str(g.device))
    payload = {"out": str(out.resolve()), "sampler_ckpt": str(sampler_ckpt), "translator_ckpt": str(translator_ckpt) if translator_ckpt else None,
               "labeller_ckpt": str(labeller) if labeller else None, "classes": classes, "threshold": t,
               "batch_size": int(g.batch_size), "shard_size": int(g.shard_size), "seed": int(cfg.seed), "device": device,
               "mask": {"rule": str(cfg.mask.rule), "threshold": float(cfg.mask.threshold), "percentile": float(cfg.mask.percentile),
                        "min_area": int(cfg.mask.min_area), "smooth_sigma": float(cfg.mask.smooth_sigma)}}
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    for tmp in (out / SHARDS).glob("*.tmp"):  # an interrupted shard is redone from scratch
        shutil.rmtree(tmp, ignore_errors=True)
    streams = classes if conditional else ["*"]
    cap = int(math.ceil(float(g.max_factor) * max(quotas.values()) / int(g.shard_size)))
    t0 = time.perf_counter()
    pool = runtime.StatefulPool("augment.stages.generate:ShardWorker", payload, int(g.workers),
                                {"name": "inline"} if int(g.workers) == 1 else cfg.runtime)
    next_k = {s: 0 for s in streams}
    warned: list[list[str]] = []
    last_logged = -1
    done: list[str] = []
    summaries: dict[str, dict] = {}
    bar_total = sum(quotas.values())
    print(f"generate: {n} images of {', '.join(classes)} with {g.sampler}"
          f"{' + ' + str(g.translator) + ' masks' if g.translator else ''}, t={t}, into {out}")
    try:
        while True:
            order = [shard_name(s, k) for s in streams for k in range(next_k[s])]
            kept, rejected, _ = assemble(out, order, quotas, classes, conditional)
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
    kept, rejected, rows = assemble(out, order, quotas, classes, conditional)
    seconds = time.perf_counter() - t0
    n = sum(kept.values())  # fewer than asked only with --allow-short
    timings = {k: sum(summaries[o]["timings"][k] for o in order) for k in ("sample", "label", "translate", "write")}
    card = finalize(out, rows, classes, cfg, kept, rejected, t, {
        "sampler": {"family": str(g.sampler), "checkpoint": str(sampler_ckpt), "sha256": sha256(sampler_ckpt)},
        "translator": ({"family": str(g.translator), "checkpoint": str(translator_ckpt), "sha256": sha256(translator_ckpt)}
                       if translator_ckpt else None),
        "labeller": ({"checkpoint": str(labeller), "sha256": sha256(labeller)} if labeller else {"checkpoint": "ucgan C"}),
    }, {"seconds": seconds, "images_per_second": n / seconds if seconds else None, **timings}, n)
    rows_md = [[c, quotas[c], kept[c]] for c in classes]
    print(markdown_table(rows_md, ["class", "requested", "kept"]))
    print(f"rejected {rejected} samples below t={t}; {n / seconds:.1f} images/s")
    return {"n": n, "counts": kept, "rejected": rejected, "threshold": t, "out": str(out), "seconds": seconds,
            "images_per_second": n / seconds if seconds else None, "timings": timings, "card": card["checkpoints"]}


def finalize(out: Path, rows: list[dict], classes: list[str], cfg: DictConfig, kept: dict, rejected: int, t: float,
             checkpoints: dict, timings: dict, n: int) -> dict:
    """Move kept files out of the shards, write labels.csv and dataset.json, drop the shards.

    Idempotent: a finalize interrupted half-way is completed by the next ``--resume``."""
    import pandas as pd

    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    table = []
    gen_name = str(cfg.generate.sampler)
    for r in rows:
        src = out / SHARDS / r["shard"]
        for rel in [f"images/{r['id']}.png", *r["masks"]]:
            if (src / rel).exists():
                os.replace(src / rel, out / rel)
        vec = np.array([1.0 if c in r["labels"] else 0.0 for c in classes])
        table.append({"Image Index": f"{r['id']}.png", "Finding Labels": finding_string(vec, classes),
                      "Patient ID": r["id"], "file": f"images/{r['id']}.png", "mask": "|".join(r["masks"]),
                      **{f"p_{c}": round(float(p), 6) for c, p in zip(classes, r["probs"])},
                      "generator": gen_name, "seed": f"{int(cfg.seed)}:{r['attempt']}"})
    df = pd.DataFrame(table).sort_values("Image Index", kind="stable")
    tmp = out / ".labels.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out / "labels.csv")
    card = {"format": "augment synthetic dataset v1", "n": n, "classes": classes, "counts": kept, "rejected": rejected,
            "threshold": t, "image_size": None, "checkpoints": checkpoints, "config": to_dict(cfg),
            "versions": versions(), "timings": timings}
    from PIL import Image

    if table:
        with Image.open(out / table[0]["file"]) as im:
            card["image_size"] = im.size[0]
    write_json(out / "dataset.json", card)
    shutil.rmtree(out / SHARDS, ignore_errors=True)
    return card
