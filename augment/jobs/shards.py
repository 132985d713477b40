"""The generation work unit: :class:`ShardWorker` writes one complete shard of ``augment generate``.

Sample ``i`` of a stream draws its noise from a generator seeded by ``(seed, stream, i)``, and every
forward pass has exactly ``micro_batch`` rows, always the same samples (see :class:`ShardWorker`), so the
output does not depend on workers or ``--batch-size``. A shard is written into ``.shards/<k>.tmp`` and
renamed to ``.shards/<k>`` when complete, so a killed run never leaves a half-written shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from augment.errors import UserError
from augment.jobs.saliency import cam_masks
from augment.models import load_model
from classifiers.model import load_classifier
from cxrbase import to_uint8, write_png
from generators.masks import MaskRuleError, diff_to_mask
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
    """Loads the models once; ``run(spec)`` writes one complete shard. Ray makes it an actor.

    Batch invariance: every forward pass (sampler, labeller, translator) has exactly ``micro_batch``
    rows, and micro-batch ``j`` of shard ``k`` always holds the same samples (``k * shard_size + j *
    micro_batch ...``, a short last one padded with copies of its last sample), so no sample's result
    depends on ``--batch-size`` or on which other samples share a batch with it. The labeller and the
    translator see the image as written (``uint8`` on disk, mapped back to [-1, 1]), so ``p_<class>``
    and the masks describe exactly the saved pixels. ``--batch-size`` only sets how many samples are
    handled (and held in memory) per step.
    """

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
            try:
                self.labeller, meta = load_classifier(payload["labeller_ckpt"], map_location=self.device)
            except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
                raise UserError(f"the pseudo-labeller {payload['labeller_ckpt']} cannot be rebuilt "
                                f"({str(exc).splitlines()[0][:300]}): pass a checkpoint of augment classify") from None
            self.labeller_classes = list(meta["classes"])
        self.classes = payload["classes"]
        self.micro = int(payload["micro_batch"])

    def pseudo_probs(self, x: torch.Tensor) -> torch.Tensor:
        """p(class) over the requested classes, B x C."""
        if self.labeller is not None:
            probs = torch.sigmoid(self.labeller(x).float())
            cols = [self.labeller_classes.index(c) for c in self.classes]
        else:
            probs = self.sampler.classify(x)
            cols = [self.sampler_classes.index(c) for c in self.classes]
        return probs[:, cols]

    def sample(self, stream: str, idx: list[int]) -> torch.Tensor:
        """Images of samples ``idx`` (exactly ``micro_batch`` of them), float in [-1, 1]."""
        seed, sid = int(self.p["seed"]), stream_id(stream)
        z = torch.stack([torch.randn(self.sampler.z_dim, generator=torch.Generator().manual_seed(
            derive_seed(seed, sid, i))) for i in idx]).to(self.device)
        if self.conditional:
            y = torch.zeros(len(z), len(self.sampler_classes), device=self.device)
            y[:, self.sampler_classes.index(stream)] = 1
            return self.sampler.G(z, y)
        return self.sampler.G(z)

    def finding_masks(self, x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> dict[str, np.ndarray]:
        """``{finding: B x H x W uint8 0/255}`` for the kept images labelled with it: the translator removes
        only that finding (target = the image's labels minus it) from the whole micro-batch (a fixed
        shape), and each image's difference map becomes its mask on its own (an image whose map the
        rule selects nothing of gets an empty mask)."""
        tcls = self.translator_classes
        current = torch.zeros(len(x), len(tcls), device=self.device)
        for j, c in enumerate(self.classes):
            if c in tcls:
                current[:, tcls.index(c)] = labels[:, j]
        current[~keep] = 0
        out: dict[str, np.ndarray] = {}
        for j, c in enumerate(self.classes):
            rows = (keep & (labels[:, j] == 1)).nonzero().flatten().tolist()
            if c not in tcls or not rows:
                continue
            target = current.clone()
            target[:, tcls.index(c)] = 0
            diff = self.translator.translate(x, target).diff_map.float().cpu().numpy()
            m = np.zeros((len(x), *x.shape[2:]), dtype=np.uint8)
            for r in rows:
                try:
                    m[r] = diff_to_mask(diff[r, 0], finding=c, **self.p["mask"]) * 255
                except MaskRuleError as exc:
                    if "selected no pixel" not in str(exc):
                        raise UserError(f"mask.*: {exc}") from None
            out[c] = m
        return out

    def cam_finding_masks(self, x: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> dict[str, np.ndarray]:
        """``{finding: B x H x W uint8 0/255}`` from the pseudo-labeller's Grad-CAM (or Grad-CAM++) maps of the
        kept images labelled with the finding (``--masks gradcam``: no translator needed)."""
        model, names = ((self.labeller, self.labeller_classes) if self.labeller is not None
                        else (self.sampler.C, self.sampler_classes))
        findings = labels.clone()
        findings[~keep] = 0
        try:
            got = cam_masks(model, names, x, findings.to(x.device), self.classes, self.p["mask"], variant=self.p["cam"])
        except MaskRuleError as exc:
            raise UserError(f"mask.*: {exc}") from None
        return {c: (m[:, 0].cpu().numpy() > 0.5).astype(np.uint8) * 255 for c, m in got.items()}

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
        t, mb = float(p["threshold"]), self.micro
        per_step = max(1, math.ceil(int(p["batch_size"]) / mb))  # micro-batches per step
        rows: list[dict] = []
        timings = {"sample": 0.0, "label": 0.0, "translate": 0.0, "write": 0.0}
        first, end = k * size, (k + 1) * size
        micro_starts = list(range(first, end, mb))  # aligned to the shard: independent of --batch-size
        try:
            for g0 in range(0, len(micro_starts), per_step):
                for start in micro_starts[g0:g0 + per_step]:
                    idx = list(range(start, min(start + mb, end)))
                    t0 = time.perf_counter()
                    x = self.sample(stream, idx + [idx[-1]] * (mb - len(idx)))
                    imgs = to_uint8(x)  # what is written: the labeller and the translator see exactly this
                    xq = torch.from_numpy(imgs).float().unsqueeze(1).div_(127.5).sub_(1.0).to(self.device)
                    t1 = time.perf_counter()
                    probs = self.pseudo_probs(xq).float().cpu()
                    t2 = time.perf_counter()
                    labels = (probs >= t).float()
                    if self.conditional:  # a CGAN image is a candidate for its own class only
                        keep = labels[:, self.classes.index(stream)] == 1
                    else:
                        keep = labels.sum(1) > 0
                    keep[len(idx):] = False
                    if not keep.any():
                        masks = {}
                    elif self.translator is not None:
                        masks = self.finding_masks(xq, labels.to(self.device), keep.to(self.device))
                    elif self.p.get("cam"):
                        masks = self.cam_finding_masks(xq, labels, keep)
                    else:
                        masks = {}
                    t3 = time.perf_counter()
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
                                write_png(tmp / mf, masks[c][j])
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
