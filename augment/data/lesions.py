"""Real chest X-rays with lesion-level ground truth: ``../shared/data/cxr-lesions`` (its README).

Three sets, one :class:`LesionSet` each:

- ``nih_bbox``: NIH ChestX-ray14 images with radiologist boxes (``boxes.csv``) and image-level labels
  (``labels.csv``, NIH names, patient ids).
- ``covidqu_infection``: COVID-QU-Ex images with infection pixel masks (``masks/``, the ``Pneumonia``
  finding), the component boxes derived from them, and normals (empty masks). No patient ids: the
  near-duplicate pairs of ``overlaps.csv`` define ``groups`` (split by group, never by image), and
  ``overlaps_real`` flags the images that duplicate one of ``cxr-real``.
- ``jsrt_nodules``: nodule boxes for the JSRT images of ``cxr-real`` (paths relative to it), with the
  lung masks of ``cxr-real/masks.csv``.

Boxes are ``x, y, w, h`` in pixels of the image grid (x = column, y = row); a box covers the pixels
whose centres lie in ``[x, x + w) x [y, y + h)`` (:func:`augment.metrics.localisation.box_mask`).
Images are N x S x S uint8; with ``size`` different from the files' 128 px, images are resized
(LANCZOS), masks by area then ``>= 0.5``, and boxes scaled.

Bad data (a listed file missing, a box outside its image, a missing column) raises
:class:`~augment.errors.UserError` naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from augment.data.labels import NO_FINDING, UnknownClassError, canonical
from augment.data.sources import read_csv_checked
from augment.errors import UserError

LESION_SETS: tuple[str, ...] = ("nih_bbox", "covidqu_infection", "jsrt_nodules")
_BOX_COLUMNS = ["file", "label", "x", "y", "w", "h"]
_EPS = 1e-6  # boxes may touch the border to within rounding of the CSV's two decimals


@dataclass
class LesionSet:
    """One lesion set, loaded.  ``boxes`` has one row per box: ``image`` (row into ``images``),
    ``label`` (canonical finding), ``x, y, w, h`` (pixels on the ``size`` grid)."""

    name: str
    root: Path
    files: list[str]
    images: np.ndarray                          # N x S x S uint8
    labels: list[tuple[str, ...]]               # canonical findings per image; (No Finding,) for normals
    patient_ids: list[str]
    boxes: pd.DataFrame
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # finding -> N x S x S bool (pixel ground truth)
    lungs: np.ndarray | None = None             # N x S x S bool, where every image has a lung mask
    groups: np.ndarray | None = None            # near-duplicate group per image (covidqu), else None
    overlaps_real: np.ndarray | None = None     # image duplicates one of cxr-real (covidqu), else None
    size: int = 128

    def __len__(self) -> int:
        return len(self.files)

    @property
    def findings(self) -> list[str]:
        """The findings with ground truth (boxes or masks), in first-seen order."""
        seen = list(dict.fromkeys([*self.boxes["label"], *self.masks]))
        return [f for f in seen if f != NO_FINDING]

    def has(self, i: int, finding: str) -> bool:
        return finding in self.labels[i]

    def normal(self) -> np.ndarray:
        return np.array([lab == (NO_FINDING,) for lab in self.labels], dtype=bool)


def subset(ls: LesionSet, rows: np.ndarray) -> LesionSet:
    """The images ``rows`` of a set (in that order) with their boxes, masks and lungs (e.g. one fold)."""
    rows = np.asarray(rows, dtype=int)
    where = {int(r): j for j, r in enumerate(rows)}
    boxes = ls.boxes[ls.boxes["image"].isin(where)].copy()
    boxes["image"] = boxes["image"].map(where)
    return LesionSet(name=ls.name, root=ls.root, files=[ls.files[r] for r in rows], images=ls.images[rows],
                     labels=[ls.labels[r] for r in rows], patient_ids=[ls.patient_ids[r] for r in rows],
                     boxes=boxes.sort_values("image", kind="stable").reset_index(drop=True),
                     masks={f: m[rows] for f, m in ls.masks.items()},
                     lungs=None if ls.lungs is None else ls.lungs[rows],
                     groups=None if ls.groups is None else ls.groups[rows],
                     overlaps_real=None if ls.overlaps_real is None else ls.overlaps_real[rows], size=ls.size)


def _labels(cell: str, where: str) -> tuple[str, ...]:
    names = [t.strip() for t in str(cell).split("|") if t.strip()]
    try:
        return tuple(canonical(n) for n in names) or (NO_FINDING,)
    except UnknownClassError as exc:
        raise UserError(f"{where}: {exc}: fix the label") from None


def _check_files(root: Path, files: list[str], listed_in: Path, fix: str) -> None:
    missing = [f for f in dict.fromkeys(files) if not (root / f).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image file(s) listed in {listed_in} are missing under {root} "
                        f"(e.g. {missing[0]}): {fix}")


def _read_gray(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"))
    except (OSError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read image {path}: {exc}: restore the file") from None


def _resize(a: np.ndarray, size: int, mask: bool = False) -> np.ndarray:
    if a.shape == (size, size):
        return a
    if mask:
        m = Image.fromarray((a > 0).astype(np.float32) * 255.0, mode="F").resize((size, size), Image.Resampling.BOX)
        return np.asarray(m) >= 127.5
    return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.LANCZOS))


def _boxes(df: pd.DataFrame, index: dict[str, int], shapes: dict[str, tuple[int, int]], path: Path) -> pd.DataFrame:
    """Validated boxes (floats) with the row of their image; a box outside its image is refused."""
    rows = []
    for k, r in df.iterrows():
        try:
            x, y, w, h = (float(r[c]) for c in ("x", "y", "w", "h"))
        except ValueError:
            raise UserError(f"{path} line {k + 2}: box {r['x']},{r['y']},{r['w']},{r['h']} is not numeric: fix the CSV") from None
        hh, ww = shapes[r["file"]]
        if not (np.isfinite([x, y, w, h]).all() and w > 0 and h > 0 and x >= -_EPS and y >= -_EPS
                and x + w <= ww + _EPS and y + h <= hh + _EPS):
            raise UserError(f"{path} line {k + 2}: box x={x:g} y={y:g} w={w:g} h={h:g} of {r['file']} lies outside "
                            f"its {ww} x {hh} image (or is empty): fix or drop that row")
        rows.append((index[r["file"]], _labels(r["label"], f"{path} line {k + 2}")[0], x, y, w, h))
    return pd.DataFrame(rows, columns=["image", "label", "x", "y", "w", "h"])


def _take(labels: list[tuple[str, ...]], limit: int | None) -> np.ndarray:
    """Rows kept under ``limit``: the first ``limit`` lesion images and the first ``limit`` normals."""
    n = len(labels)
    if limit is None:
        return np.arange(n)
    normal = np.array([lab == (NO_FINDING,) for lab in labels], dtype=bool)
    return np.sort(np.concatenate([np.flatnonzero(~normal)[:limit], np.flatnonzero(normal)[:limit]]))


def _finish(name: str, root: Path, files: list[str], image_root: Path, labels: list[tuple[str, ...]],
            patients: list[str], boxes_df: pd.DataFrame, boxes_path: Path, size: int, limit: int | None,
            masks: dict[str, list[str]] | None = None, lungs: list[str | None] | None = None,
            groups: np.ndarray | None = None, overlaps_real: np.ndarray | None = None) -> LesionSet:
    keep = _take(labels, limit)
    files = [files[i] for i in keep]
    images = [_read_gray(image_root / f) for f in files]
    shapes = {f: im.shape for f, im in zip(files, images)}
    index = {f: i for i, f in enumerate(files)}
    boxes_df = boxes_df[boxes_df["file"].isin(index)].reset_index(drop=True)
    boxes = _boxes(boxes_df, index, shapes, boxes_path)
    for f, im in zip(files, images):
        if im.shape[0] != im.shape[1]:
            raise UserError(f"{image_root / f} is {im.shape[1]} x {im.shape[0]}, not square: the lesion sets are "
                            "square 128 px images; restore the file")
    if len(boxes):
        native = np.array([images[i].shape[0] for i in boxes["image"]], dtype=float)
        boxes[["x", "y", "w", "h"]] = boxes[["x", "y", "w", "h"]].to_numpy() * (size / native)[:, None]
    out_masks: dict[str, np.ndarray] = {}
    for finding, mfiles in (masks or {}).items():
        arr = []
        for i in keep:
            m = _read_gray(root / mfiles[i]) > 127
            if m.shape != images[len(arr)].shape:
                raise UserError(f"mask {root / mfiles[i]} is {m.shape} but its image is {images[len(arr)].shape}: "
                                "restore the file")
            arr.append(_resize(m, size, mask=True))
        out_masks[finding] = np.stack(arr) if arr else np.zeros((0, size, size), dtype=bool)
    lung_arr = None
    if lungs is not None and all(lungs[i] for i in keep) and len(keep):
        lung_arr = np.stack([_resize(_read_gray(image_root / str(lungs[i])) > 127, size, mask=True) for i in keep])
    return LesionSet(
        name=name, root=root, files=files,
        images=np.stack([_resize(im, size) for im in images]) if images else np.zeros((0, size, size), np.uint8),
        labels=[labels[i] for i in keep], patient_ids=[patients[i] for i in keep], boxes=boxes, masks=out_masks,
        lungs=lung_arr, groups=None if groups is None else groups[keep],
        overlaps_real=None if overlaps_real is None else overlaps_real[keep], size=size)


def load_nih_bbox(root: Path, *, size: int = 128, limit: int | None = None) -> LesionSet:
    """``nih_bbox``: images, image-level labels, patient ids and the radiologist boxes."""
    root = Path(root)
    hint = "point evaluate.lesions_root at a copy of cxr-lesions (its nih_bbox/ folder)"
    lab = read_csv_checked(root / "labels.csv", ["file", "labels", "patient_id"], hint)
    box = read_csv_checked(root / "boxes.csv", _BOX_COLUMNS, hint)
    _check_files(root, list(lab["file"]), root / "labels.csv", "restore the images or use a complete cxr-lesions copy")
    _check_files(root, list(box["file"]), root / "boxes.csv", "restore the images or drop their boxes")
    unknown = sorted(set(box["file"]) - set(lab["file"]))
    if unknown:
        raise UserError(f"{root / 'boxes.csv'} has boxes on {len(unknown)} image(s) not in labels.csv (e.g. {unknown[0]}): "
                        "add their labels or drop the boxes")
    labels = [_labels(c, f"{root / 'labels.csv'}: {f}") for f, c in zip(lab["file"], lab["labels"])]
    return _finish("nih_bbox", root, list(lab["file"]), root, labels, list(lab["patient_id"]), box,
                   root / "boxes.csv", size, limit)


def _duplicate_groups(files: list[str], pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over ``overlaps.csv``: pairs inside the set (and pairs sharing one cxr-real image) join
    a group; returns (group id per file, flag: the file duplicates a cxr-real image)."""
    parent = list(range(len(files)))
    index = {f: i for i, f in enumerate(files)}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    real = np.zeros(len(files), dtype=bool)
    first_real: dict[str, int] = {}
    for a, b in zip(pairs["file"], pairs["other"]):
        if a not in index:
            continue
        if b in index:
            parent[find(index[a])] = find(index[b])
        elif str(b).startswith("cxr-real/"):
            real[index[a]] = True
            j = first_real.setdefault(b, index[a])
            parent[find(index[a])] = find(j)
    roots = [find(i) for i in range(len(files))]
    ids = {r: k for k, r in enumerate(dict.fromkeys(roots))}
    return np.array([ids[r] for r in roots]), real


def load_covidqu_infection(root: Path, *, size: int = 128, limit: int | None = None) -> LesionSet:
    """``covidqu_infection``: images, infection masks (finding ``Pneumonia``), component boxes and
    near-duplicate groups from ``overlaps.csv``."""
    root = Path(root)
    hint = "point evaluate.lesions_root at a copy of cxr-lesions (its covidqu_infection/ folder)"
    lab = read_csv_checked(root / "labels.csv", ["file", "labels", "mask_file"], hint)
    box = read_csv_checked(root / "boxes.csv", _BOX_COLUMNS, hint)
    files = list(lab["file"])
    _check_files(root, files, root / "labels.csv", "restore the images or use a complete cxr-lesions copy")
    _check_files(root, list(lab["mask_file"]), root / "labels.csv", "restore the masks/ folder")
    _check_files(root, list(box["file"]), root / "boxes.csv", "restore the images or drop their boxes")
    labels = [_labels(c, f"{root / 'labels.csv'}: {f}") for f, c in zip(files, lab["labels"])]
    over = root / "overlaps.csv"
    pairs = read_csv_checked(over, ["file", "other"], hint) if over.is_file() else pd.DataFrame(columns=["file", "other"])
    groups, real = _duplicate_groups(files, pairs)
    return _finish("covidqu_infection", root, files, root, labels, [""] * len(files), box, root / "boxes.csv",
                   size, limit, masks={"Pneumonia": list(lab["mask_file"])}, groups=groups, overlaps_real=real)


def load_jsrt_nodules(root: Path, real_root: Path, *, size: int = 128, limit: int | None = None) -> LesionSet:
    """``jsrt_nodules``: the JSRT images of ``cxr-real`` (``real_root``) with nodule boxes and lung masks."""
    root, real_root = Path(root), Path(real_root)
    hint = "point evaluate.lesions_root at a copy of cxr-lesions (its jsrt_nodules/ folder)"
    lab = read_csv_checked(root / "labels.csv", ["file", "labels"], hint)
    box = read_csv_checked(root / "boxes.csv", _BOX_COLUMNS, hint)
    files = list(lab["file"])
    fix = "set evaluate.real_root to the cxr-real folder that holds images/jsrt/"
    _check_files(real_root, files, root / "labels.csv", fix)
    _check_files(real_root, list(box["file"]), root / "boxes.csv", fix)
    labels = [_labels(c, f"{root / 'labels.csv'}: {f}") for f, c in zip(files, lab["labels"])]
    patients = list(lab["patient_id"]) if "patient_id" in lab.columns else [Path(f).stem for f in files]
    lungs: list[str | None] = [None] * len(files)
    masks_csv = real_root / "masks.csv"
    if masks_csv.is_file():
        m = read_csv_checked(masks_csv, ["file", "mask_file", "structure"], fix)
        by_file = dict(zip(m.loc[m["structure"] == "lungs", "file"], m.loc[m["structure"] == "lungs", "mask_file"]))
        lungs = [by_file.get(f) for f in files]
        _check_files(real_root, [p for p in lungs if p], masks_csv, "restore cxr-real's masks/ folder")
    return _finish("jsrt_nodules", root, files, real_root, labels, patients, box, root / "boxes.csv", size,
                   limit, lungs=lungs)


def lung_atlas(real_root: Path, *, size: int = 128, prefix: str = "images/jsrt/") -> tuple[np.ndarray, int]:
    """The population lung field: the pixel-wise mean (float32 ``size x size`` in [0, 1]) of the manual
    lung masks that ``cxr-real/masks.csv`` lists for the images under ``prefix`` (default: the 247 JSRT
    images, SCR masks), and how many masks it averages.  It is the "whole lung" reference of the
    localisation tables: what a mask that knows only where lungs usually are scores."""
    real_root = Path(real_root).expanduser()
    fix = "set evaluate.real_root to the cxr-real folder (its masks.csv and masks/), or drop lung_atlas from evaluate.sources"
    path = real_root / "masks.csv"
    if not path.is_file():
        raise UserError(f"the lung atlas needs {path}, which does not exist: {fix}")
    m = read_csv_checked(path, ["file", "mask_file", "structure"], fix)
    files = list(m.loc[(m["structure"] == "lungs") & m["file"].astype(str).str.startswith(prefix), "mask_file"])
    if not files:
        raise UserError(f"{path} lists no lung masks for images under {prefix}: {fix}")
    _check_files(real_root, files, path, "restore cxr-real's masks/ folder")
    acc = np.zeros((size, size), np.float64)
    for f in files:
        acc += _resize(_read_gray(real_root / f) > 127, size, mask=True)
    return (acc / len(files)).astype(np.float32), len(files)


def load_lesion_set(name: str, lesions_root: Path, real_root: Path | None = None, *, size: int = 128,
                    limit: int | None = None) -> LesionSet:
    """Load one of :data:`LESION_SETS` from the cxr-lesions folder ``lesions_root``."""
    lesions_root = Path(lesions_root).expanduser()
    if name not in LESION_SETS:
        raise UserError(f"unknown lesion set '{name}': use one of {', '.join(LESION_SETS)}")
    root = lesions_root / name
    if not root.is_dir():
        raise UserError(f"{root} does not exist: point evaluate.lesions_root at the cxr-lesions folder "
                        "(../shared/data/cxr-lesions)")
    if size < 8:
        raise UserError(f"evaluate.localisation_size={size} is too small: use at least 8 px")
    if name == "nih_bbox":
        return load_nih_bbox(root, size=size, limit=limit)
    if name == "covidqu_infection":
        return load_covidqu_infection(root, size=size, limit=limit)
    if real_root is None or not Path(real_root).expanduser().is_dir():
        raise UserError(f"jsrt_nodules needs the cxr-real images: set evaluate.real_root (got {real_root})")
    return load_jsrt_nodules(root, Path(real_root).expanduser(), size=size, limit=limit)
