"""The generation work unit: :class:`ShardWorker` writes one complete shard of ``augment generate``.

Sample ``i`` of a stream draws its noise from a generator seeded by ``(seed, stream, i)``, so the output
does not depend on workers or batch size (every forward pass has exactly ``batch_size`` rows: a short
last chunk is padded and the padding discarded). A shard is written into ``.shards/<k>.tmp`` and
renamed to ``.shards/<k>`` when complete, so a killed run never leaves a half-written shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from augment.errors import UserError
from augment.models import load_model
from classifiers.model import load_classifier
from cxrbase import to_uint8, write_png
from generators.masks import per_finding_masks
from generators.train import derive_seed

SHARDS = ".shards"


def stream_id(stream: str) -> int:
    """A stable integer for a stream name (a class, or ``*`` for the shared UCGAN stream)."""
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:4], "little")


def shard_name(stream: str, k: int) -> str:
    """Folder name of shard ``k`` of a stream."""
    return f"{stream.lower() if stream != '*' else 'u'}-{k:05d}"


def sample_name(stream: str, i: int) -> str:
    """The id of sample ``i`` of a stream (its image is ``images/<id>.png``)."""
    return f"{stream.lower() if stream != '*' else 'u'}-{i:08d}"


class ShardWorker:
    """Loads the models once; ``run(spec)`` writes one complete shard. Ray makes it an actor."""

    def __init__(self, payload: dict) -> None:
        self.p = payload
        self.device = torch.device(payload["device"])
        self.sampler, ck = load_model(Path(payload["sampler_ckpt"]), kind="sampler")
        self.sampler.to(self.device)
        self.conditional = bool(self.sampler.conditional)
        self.sampler_classes = list(ck["classes"])
        self.translator = None
        if payload.get("translator_ckpt"):
            self.translator, tk = load_model(Path(payload["translator_ckpt"]), kind="translator")
            self.translator.to(self.device)
            self.translator_classes = list(tk["classes"])
        self.labeller = None
        if payload.get("labeller_ckpt"):
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
                    sample_id = sample_name(stream, i)
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
