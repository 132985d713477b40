"""Mask sources beside the translators, and their localisation scores on real lesion sets.

A *map source* turns uint8 images (N x H x W) into evidence maps for one finding (float32 N x H x W,
higher = more lesion-like).  Every source goes through the same map -> mask rule (the ``mask.*``
settings, :func:`augment.jobs.masks.mask_rule`, applied by :func:`generators.masks.diff_to_mask`) and
the same metrics:

- ``random``: the control.  A smooth random field per image: a ``cells x cells`` grid of N(0, 1)
  values (one ``torch.Generator`` seeded from ``(seed, image key)``, so an image's map does not depend
  on the batch or the order) upsampled bilinearly to the image and scaled to [0, 1].
- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) of a trained classifier at its last convolutional
  stage (timm's ``forward_features``: ``layer4`` of a ResNet), or at the module named by ``layer``:
  ``w_k = mean_ij dS_c/dA^k_ij``, ``L = ReLU(sum_k w_k A^k)``, upsampled bilinearly to the image.
- ``gradcam_pp``: Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19 with the exponential of the score, for
  which the second and third derivatives are powers of the first):
  ``alpha^kc_ij = g^2 / (2 g^2 + sum_ab A^k_ab g^3)`` (0 where the denominator is 0),
  ``w_k = sum_ij alpha_ij ReLU(g_ij)``, ``L = ReLU(sum_k w_k A^k)``; ``g = dS_c/dA``.  The per-image
  factor ``exp(S_c)`` is dropped (as pytorch-grad-cam does): it scales the whole map only.
- ``lung_atlas``: the "whole lung" reference.  The same map for every image and finding: the mean of the
  JSRT manual lung masks of ``cxr-real`` (:func:`augment.data.lesions.lung_atlas`), so its mask is the
  population lung field.  It knows nothing of the image; a source that localises must beat it.
- a translator (``fixed_point``, ...): ``sign(finding) * (x - healed)`` with the image healed to
  ``No Finding`` (:func:`augment.jobs.masks.translate_all`).

The saliency maps (random, Grad-CAM, Grad-CAM++) are divided by their per-image maximum before the
rule (so ``mask.rule=fixed`` thresholds a share of the peak); the raw maps are kept for the pointing
game and detection AUC.  A translator's map is in image units already and goes to the rule as is.

Grad-CAM is ~30 lines here rather than captum's ``LayerGradCam``: captum has no Grad-CAM++, its
``LayerGradCam`` is the same two equations, and the project keeps its dependency list short; a test
checks the two agree when captum is installed (``tests/metrics/test_localisation.py``).

:func:`localise` scores sources on a :class:`~augment.data.lesions.LesionSet`: the box protocol of
:mod:`augment.metrics.localisation` on every box (the map of that box's finding), Dice / IoU / PoI
against pixel masks, detection AUC (max of the raw map, lesion images vs normals, where the set has
normals and pixel masks or lung masks) and lung containment where lung masks exist.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from augment.data.lesions import LesionSet
from augment.errors import UserError
from augment.metrics.localisation import box_scores, box_table, pointing_hit
from augment.metrics.masks import detection_auc, dice, iou, lung_containment, mean_std, poi
from cxrbase import to_x
from generators.masks import MaskRuleError, diff_to_mask, finding_sign

SALIENCY_SOURCES: tuple[str, ...] = ("random", "gradcam", "gradcam_pp", "lung_atlas")
CAM_VARIANTS: tuple[str, ...] = ("gradcam", "gradcam_pp")


# ------------------------------------------------------------------------------------------- maps
def cam(model: nn.Module, x: torch.Tensor, class_index: int, *, variant: str = "gradcam",
        layer: str | None = None) -> torch.Tensor:
    """Grad-CAM / Grad-CAM++ maps (B x H x W, >= 0, upsampled to ``x``) of logit ``class_index``.

    ``layer``: a module name of ``model`` (``dict(model.named_modules())``); ``None`` = the output of
    timm's ``forward_features`` (the last conv stage).  The model should be in eval mode (batch norm
    statistics fixed), so each image's map depends on that image only.
    """
    if variant not in CAM_VARIANTS:
        raise ValueError(f"unknown CAM variant {variant!r}; use one of {CAM_VARIANTS}")
    with torch.enable_grad():
        x = x.detach().requires_grad_()  # so the activations are in a graph even with frozen weights
        if layer is None:  # the head alone needs differentiating: cut the graph at the activations
            acts = model.forward_features(x).detach().requires_grad_()
            logits = model.forward_head(acts)
        else:
            modules = dict(model.named_modules())
            if layer not in modules:
                raise ValueError(f"the classifier has no module '{layer}' (it has e.g. "
                                 f"{', '.join(n for n, _ in list(model.named_children())[:8])})")
            held: list[torch.Tensor] = []
            handle = modules[layer].register_forward_hook(lambda m, i, o: held.append(o))
            try:
                logits = model(x)
            finally:
                handle.remove()
            acts = held[-1]
        (g,) = torch.autograd.grad(logits[:, class_index].sum(), acts)
    acts, g = acts.detach().float(), g.float()
    if variant == "gradcam":
        w = g.mean((2, 3), keepdim=True)
    else:
        g2 = g * g
        denom = 2.0 * g2 + (acts * g2 * g).sum((2, 3), keepdim=True)
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
                            torch.zeros_like(g2))
        w = (alpha * F.relu(g)).sum((2, 3), keepdim=True)
    out = F.relu((w * acts).sum(1, keepdim=True))
    out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out[:, 0]


def random_map(seed: int, key: int, shape: tuple[int, int], cells: int) -> np.ndarray:
    """One smooth random map in [0, 1] (float32 H x W) for image ``key``: a ``cells x cells`` N(0, 1)
    grid from a ``torch.Generator`` seeded by ``(seed, key)``, upsampled bilinearly."""
    state = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(key) & 0xFFFFFFFF]).generate_state(1, np.uint64)[0])
    g = torch.Generator().manual_seed(state & 0x7FFFFFFFFFFFFFFF)
    z = torch.randn(1, 1, cells, cells, generator=g)
    m = F.interpolate(z, size=shape, mode="bilinear", align_corners=False)[0, 0]
    m = m - m.min()
    return (m / m.max().clamp_min(1e-12)).numpy().astype(np.float32)


class MapSource:
    """A source of evidence maps; ``normalise``: divide by the per-image max before the mask rule."""

    name = "source"
    normalise = True

    def knows(self, finding: str) -> bool:
        return True

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


class RandomMaps(MapSource):
    """The random-map control: one smooth random field per image key (the same for every finding)."""

    name = "random"

    def __init__(self, seed: int, cell_px: int = 16) -> None:
        self.seed, self.cell_px = int(seed), int(cell_px)

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:
        h, w = images.shape[1:]
        cells = max(2, round(h / self.cell_px))
        return np.stack([random_map(self.seed, int(k), (h, w), cells) for k in keys]) if len(keys) else \
            np.zeros((0, h, w), np.float32)


class LungAtlasMaps(MapSource):
    """The lung-field reference: one atlas map (``size x size`` in [0, 1]) for every image and finding."""

    name = "lung_atlas"

    def __init__(self, atlas: np.ndarray, n_masks: int = 0) -> None:
        self.atlas, self.n_masks = np.asarray(atlas, np.float32), int(n_masks)

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:
        if images.shape[1:] != self.atlas.shape:
            raise UserError(f"the lung atlas is {self.atlas.shape[0]} px but the images are {images.shape[1]} px: "
                            "build it at evaluate.localisation_size")
        return np.broadcast_to(self.atlas, images.shape).astype(np.float32)


class CamMaps(MapSource):
    """Grad-CAM (``variant="gradcam"``) or Grad-CAM++ (``"gradcam_pp"``) of a classifier."""

    def __init__(self, model: nn.Module, classes: Sequence[str], *, variant: str = "gradcam",
                 layer: str | None = None, batch_size: int = 32, device: str | torch.device = "cpu") -> None:
        if variant not in CAM_VARIANTS:
            raise ValueError(f"unknown CAM variant {variant!r}; use one of {CAM_VARIANTS}")
        self.model = model.to(device).eval()
        self.classes = list(classes)
        self.name, self.variant, self.layer = variant, variant, layer
        self.batch_size, self.device = int(batch_size), torch.device(device)

    def knows(self, finding: str) -> bool:
        return finding in self.classes

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:
        k = self.classes.index(finding)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = to_x(torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])[:, None]), self.device)
            out.append(cam(self.model, x, k, variant=self.variant, layer=self.layer).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, *images.shape[1:]), np.float32)


class TranslatorMaps(MapSource):
    """A translator's signed difference map (healed to No Finding); translations are cached by key."""

    normalise = False

    def __init__(self, name: str, system: Any, batch_size: int = 64) -> None:
        self.name, self.system, self.batch_size = name, system, int(batch_size)
        self._cache: dict[int, np.ndarray] = {}

    def maps(self, images: np.ndarray, finding: str, keys: np.ndarray) -> np.ndarray:
        from augment.jobs.masks import translate_all

        todo = [j for j, k in enumerate(keys) if int(k) not in self._cache]
        if todo:
            _, diffs = translate_all(self.system, images[todo], batch=self.batch_size)
            for j, d in zip(todo, diffs):
                self._cache[int(keys[j])] = d
        if not len(keys):
            return np.zeros((0, *images.shape[1:]), np.float32)
        return finding_sign(finding) * np.stack([self._cache[int(k)] for k in keys]).astype(np.float32)


# ------------------------------------------------------------------------------------------ masks
def check_mask_rule(mask_cfg: dict) -> None:
    """Refuse invalid ``mask.*`` settings up front (a rule that selects nothing later is an empty mask)."""
    probe = np.zeros((8, 8), dtype=np.float32)
    probe[2:6, 2:6] = 1.0
    try:
        diff_to_mask(probe, **{**mask_cfg, "min_area": 0, "smooth_sigma": 0.0})
    except MaskRuleError as exc:
        raise UserError(f"invalid mask settings: {exc}") from None


def maps_to_masks(maps: np.ndarray, mask_cfg: dict, normalise: bool) -> np.ndarray:
    """Evidence maps (N x H x W) -> bool masks by the ``mask.*`` rule; all-empty when it selects nothing."""
    if len(maps) == 0:
        return np.zeros(maps.shape, dtype=bool)
    m = maps.astype(np.float64)
    if normalise:
        peak = m.reshape(len(m), -1).max(1)
        m = m / np.where(peak > 0, peak, 1.0)[:, None, None]
    try:
        return diff_to_mask(m[:, None], finding=None, **mask_cfg)[:, 0].astype(bool)
    except MaskRuleError:  # settings were checked: the rule found nothing in any image
        return np.zeros(maps.shape, dtype=bool)


def cam_masks(model: nn.Module, model_classes: Sequence[str], x: torch.Tensor, findings: torch.Tensor,
              classes: Sequence[str], mask_cfg: dict, *, variant: str = "gradcam",
              layer: str | None = None) -> dict[str, torch.Tensor]:
    """Per-finding masks of a batch from a classifier's CAMs: the Grad-CAM counterpart of
    :func:`generators.masks.per_finding_masks` (same arguments and result), for ``augment generate
    --masks gradcam`` (the pseudo-labeller's maps, no translator).

    Args:
        model: the classifier (eval mode); ``model_classes`` its logit names.
        x: images B x 1 x H x W in [-1, 1].
        findings: B x len(classes) multi-hot (NaN = absent): an image gets a mask for each finding it has.
        classes: the names of ``findings``' columns, each one of ``model_classes``.
        mask_cfg: the ``mask.*`` rule (:func:`augment.jobs.masks.mask_rule`).

    Returns:
        ``{finding: B x 1 x H x W float in {0, 1}}`` on ``x``'s device, zero for images without the
        finding (and where the rule selects nothing).
    """
    unknown = [c for c in classes if c not in model_classes]
    if unknown:
        raise ValueError(f"findings {unknown} are not outputs of this classifier: {list(model_classes)}")
    if findings.shape != (x.shape[0], len(classes)):
        raise ValueError(f"findings must be B x {len(classes)} for B={x.shape[0]} images, got {tuple(findings.shape)}")
    labels = (torch.nan_to_num(findings.float(), nan=0.0) > 0.5).cpu()
    out: dict[str, torch.Tensor] = {}
    for j, name in enumerate(classes):
        rows = labels[:, j].nonzero().flatten()
        if rows.numel() == 0:
            continue
        # the whole batch goes through the model (a fixed shape: an image's map never depends on which
        # other images have the finding); the rule then runs image by image on the rows that have it
        maps = cam(model, x, list(model_classes).index(name), variant=variant, layer=layer).cpu().numpy()
        full = torch.zeros(x.shape[0], 1, *x.shape[2:], device=x.device)
        for r in rows.tolist():
            full[r, 0] = torch.from_numpy(maps_to_masks(maps[r:r + 1], mask_cfg, normalise=True)[0].astype(np.float32))
        out[name] = full
    return out


# ------------------------------------------------------------------------------------- localise
def _box_examples(ls: LesionSet, n: int) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    if ls.masks:
        for f, m in ls.masks.items():
            out += [(int(i), f) for i in np.flatnonzero(m.reshape(len(m), -1).any(1))[:n]]
        return out[:n]
    seen: set[int] = set()
    for i, f in zip(ls.boxes["image"], ls.boxes["label"]):
        if int(i) not in seen:
            seen.add(int(i))
            out.append((int(i), str(f)))
        if len(out) >= n:
            break
    return out


def localise(ls: LesionSet, sources: Sequence[MapSource], mask_cfg: dict, *, n_examples: int = 6,
             figure: Path | None = None, keep_records: bool = False) -> dict:
    """Box table, mask table and lung containment of every source on a lesion set (see the module doc).
    ``keep_records``: also return the per-box records (``box_records``: source -> list of ``{finding,
    iobb, iou, hit, image}``) so that tables of several runs (folds) can be merged with
    :func:`~augment.metrics.localisation.box_table`."""
    check_mask_rule(mask_cfg)
    normal = ls.normal()
    examples = {pair: {"masks": {}} for pair in _box_examples(ls, n_examples)}
    boxes: dict[str, list[dict]] = {s.name: [] for s in sources}
    masks: dict[str, dict[str, dict]] = {s.name: {} for s in sources}
    skipped: dict[str, list[str]] = {s.name: [] for s in sources}
    seconds = {s.name: 0.0 for s in sources}
    n_maps = {s.name: 0 for s in sources}
    for f in ls.findings:
        fb = ls.boxes[ls.boxes["label"] == f]
        pos = np.array([f in lab for lab in ls.labels], dtype=bool)
        gt = ls.masks.get(f)
        need = set(int(i) for i in fb["image"])
        if gt is not None or ls.lungs is not None:
            need |= set(np.flatnonzero(pos).tolist())
        if (gt is not None or ls.lungs is not None) and normal.any():  # detection AUC: lesion images vs normals
            need |= set(np.flatnonzero(normal).tolist())
        rows = np.array(sorted(need), dtype=int)
        where = {int(r): j for j, r in enumerate(rows)}
        for s in sources:
            if not s.knows(f):
                skipped[s.name].append(f)
                continue
            t0 = time.perf_counter()
            maps = s.maps(ls.images[rows], f, rows)
            seconds[s.name] += time.perf_counter() - t0
            n_maps[s.name] += len(rows)
            pred = maps_to_masks(maps, mask_cfg, s.normalise)
            for _, b in fb.iterrows():
                j = where[int(b["image"])]
                box = (b["x"], b["y"], b["w"], b["h"])
                ib, io = box_scores(pred[j], box)
                boxes[s.name].append({"finding": f, "iobb": ib, "iou": io, "hit": pointing_hit(maps[j], box),
                                      "image": ls.files[int(b["image"])]})
            rep: dict[str, Any] = {}
            prow = pos[rows]
            if gt is not None:
                lesion = prow & gt[rows].reshape(len(rows), -1).any(1)
                rep["n_lesion_images"] = int(lesion.sum())
                for name, fn in (("dice", dice), ("iou", iou), ("poi", poi)):
                    vals = fn(pred[lesion], gt[rows][lesion]) if lesion.any() else np.zeros(0)
                    m, sd = mean_std(vals)
                    rep[f"{name}_mean"], rep[f"{name}_std"] = (None, None) if np.isnan(m) else (m, sd)
            nrow = normal[rows]
            if nrow.any() and prow.any():
                sel = prow | nrow
                rep["detection_auc"] = detection_auc(maps[sel], prow[sel])
                rep["n_normal_images"] = int(nrow.sum())
            if ls.lungs is not None and prow.any():
                lc = lung_containment(pred[prow], ls.lungs[rows][prow])
                m, _ = mean_std(lc)
                rep["lung_containment_mean"] = None if np.isnan(m) else m
                rep["lung_containment_n"] = int(np.isfinite(lc).sum())
            if rep:
                masks[s.name][f] = rep
            for (i, ef), e in examples.items():
                if ef == f and i in where:
                    e["masks"][s.name] = pred[where[i]]
    result: dict[str, Any] = {"set": ls.name, "n_images": len(ls), "size": ls.size, "n_boxes": int(len(ls.boxes)),
                              "mask_rule": mask_cfg, "boxes": {}, "masks": {}, "speed": {}}
    for s in sources:
        if boxes[s.name]:
            result["boxes"][s.name] = box_table(boxes[s.name])
        if masks[s.name]:
            result["masks"][s.name] = masks[s.name]
        if skipped[s.name]:
            result.setdefault("not_scored", {})[s.name] = skipped[s.name]
        result["speed"][s.name] = {"maps": n_maps[s.name], "seconds": seconds[s.name],
                                   "maps_per_second": n_maps[s.name] / seconds[s.name] if seconds[s.name] else None}
    if keep_records:
        result["box_records"] = boxes
    if figure is not None and examples:
        result["figure"] = str(overlay_figure(ls, examples, [s.name for s in sources], figure))
    return result


def overlay_figure(ls: LesionSet, examples: dict[tuple[int, str], dict], names: list[str], path: Path) -> Path:
    """One row per example: the image with its ground truth (green: boxes or mask outline), then each
    source's mask (red) over the image with the ground truth."""
    from matplotlib.patches import Rectangle

    from augment.report import _plt

    plt = _plt()
    items = list(examples.items())
    ncol = 1 + len(names)
    fig, axes = plt.subplots(len(items), ncol, figsize=(1.6 * ncol, 1.6 * len(items) + 0.5), squeeze=False)
    for r, ((i, f), e) in enumerate(items):
        fb = ls.boxes[(ls.boxes["image"] == i) & (ls.boxes["label"] == f)]
        gt = ls.masks.get(f)
        for c in range(ncol):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(ls.images[i], cmap="gray", vmin=0, vmax=255)
            if gt is not None and gt[i].any():
                ax.contour(gt[i].astype(float), levels=[0.5], colors="lime", linewidths=0.7)
            for _, b in fb.iterrows():
                ax.add_patch(Rectangle((b["x"] - 0.5, b["y"] - 0.5), b["w"], b["h"], fill=False, edgecolor="lime", linewidth=0.8))
            if c == 0:
                ax.set_ylabel(f, fontsize=7)
                if r == 0:
                    ax.set_title("ground truth", fontsize=8)
                continue
            name = names[c - 1]
            m = e["masks"].get(name)
            if m is not None and m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="red", linewidths=0.7)
            if m is None:
                ax.text(0.5, 0.5, "n/a", color="yellow", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(f"{ls.name}: red = mask, green = ground truth", fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- builders
def build_sources(names: Sequence[str], *, seed: int, size: int, classifier: Path | None = None,
                  translators: dict[str, Path] | None = None, layer: str | None = None,
                  random_cell_px: int = 16, batch_size: int = 32, device: str | torch.device = "cpu",
                  real_root: Path | None = None) -> list[MapSource]:
    """The map sources ``names`` (of :data:`SALIENCY_SOURCES`) and every translator of ``translators``
    (``{family: checkpoint}``), refusing a source whose model is missing or of another image size;
    ``lung_atlas`` reads the lung masks of ``real_root`` (cxr-real)."""
    unknown = [n for n in names if n not in SALIENCY_SOURCES]
    if unknown:
        raise UserError(f"unknown mask source(s) {', '.join(unknown)} in evaluate.sources: use "
                        f"{', '.join(SALIENCY_SOURCES)} (translators come from --models)")
    out: list[MapSource] = []
    cams = [n for n in names if n in CAM_VARIANTS]
    model = classes = None
    if cams:
        if classifier is None:
            raise UserError(f"mask source {cams[0]} needs a trained classifier: pass evaluate.classifier=PATH (a "
                            "checkpoint of augment classify) or --models a train run that has models/classifier, "
                            "or drop it from evaluate.sources")
        from classifiers.model import load_classifier

        try:
            model, meta = load_classifier(classifier)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"cannot load the classifier for {cams[0]}: {exc}: pass evaluate.classifier=PATH") from None
        if int(meta.get("image_size") or size) != size:
            raise UserError(f"classifier {classifier} was trained at {meta['image_size']} px but "
                            f"evaluate.localisation_size={size}: set evaluate.localisation_size={meta['image_size']}")
        classes = list(meta["classes"])
        if layer is not None and layer not in dict(model.named_modules()):
            raise UserError(f"evaluate.gradcam_layer={layer}: the classifier has no such module "
                            f"(e.g. {', '.join(n for n, _ in list(model.named_children())[:8])})")
    for n in names:
        if n == "random":
            out.append(RandomMaps(seed, random_cell_px))
        elif n == "lung_atlas":
            if real_root is None:
                raise UserError("mask source lung_atlas needs the cxr-real lung masks: set evaluate.real_root, or drop "
                                "lung_atlas from evaluate.sources")
            from augment.data.lesions import lung_atlas

            out.append(LungAtlasMaps(*lung_atlas(real_root, size=size)))
        else:
            out.append(CamMaps(model, classes, variant=n, layer=layer, batch_size=batch_size, device=device))
    if translators:
        from augment.models import load_model

        for fam, ck in translators.items():
            system, meta = load_model(ck, kind="translator")
            if int(meta["image_size"]) != size:
                raise UserError(f"translator {fam} was trained at {meta['image_size']} px but "
                                f"evaluate.localisation_size={size}: set evaluate.localisation_size={meta['image_size']}")
            out.append(TranslatorMaps(fam, system))
    return out


__all__ = ["CAM_VARIANTS", "SALIENCY_SOURCES", "CamMaps", "MapSource", "RandomMaps", "TranslatorMaps", "build_sources",
           "cam", "cam_masks", "check_mask_rule", "localise", "maps_to_masks", "overlay_figure", "random_map"]
