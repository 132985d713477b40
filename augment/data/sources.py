"""Data sources: phantom (procedural, the default), nih, folder, chexpert, medmnist.

Each file-based source lists its rows (:class:`Rows`); :func:`load_table` decodes and resizes the
images once into the preprocessing cache and assigns the patient-level split. Every source gives
the same :class:`~augment.data.table.DataTable`, whose torch view is
:class:`~augment.data.table.XrayDataset`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from augment.data import cache, phantom
from augment.data.labels import FINDINGS, NO_FINDING, VOCABULARY, UnknownClassError, canonical, multi_hot
from augment.data.splits import split_by_patient
from augment.data.table import DataTable, fingerprint
from augment.errors import UserError
from augment.progress import progress

log = logging.getLogger(__name__)

SOURCES = ("phantom", "nih", "folder", "chexpert", "medmnist")


@dataclass
class Rows:
    """What a file-based source lists before decoding."""

    root: Path
    files: list[str]                       # relative to root (or absolute for NIH image dirs)
    labels: np.ndarray                     # N x len(VOCABULARY)
    patient_ids: list[str]
    official: list[str]                    # official split per row ('' when none)
    anatomy: dict[str, list[str | None]] = field(default_factory=dict)   # structure -> mask path per row
    lesions: dict[str, list[str | None]] = field(default_factory=dict)   # finding -> mask path per row
    arrays: np.ndarray | None = None       # pre-decoded images (medmnist), N x h x w uint8


# Every setting is read as ``cfg[key]``: the defaults live in configs/data/<source>.yaml only, so a
# data node that lacks a key fails loudly (KeyError) instead of silently using a value from here.
# Build a node by hand as ``{**to_dict(compose(["data=<source>"]).data), ...}``.


def _require_root(cfg: Mapping[str, Any], name: str) -> Path:
    root = cfg["root"]
    if not root:
        raise UserError(f"data={name} needs a folder: add data.root=/path/to/{name}")
    path = Path(str(root)).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"data.root '{root}' does not exist: point data.root at the folder holding the {name} data")
    return path


def _inside(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"path '{rel}' in the CSV escapes data.root '{root}': fix the CSV or the root")
    return path


def read_csv_checked(path: Path, required: list[str], hint: str) -> pd.DataFrame:
    """A CSV as strings (no NA parsing); a missing file, an unreadable one or missing columns is one line."""
    if not path.is_file():
        raise UserError(f"{path} not found: {hint}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(
            f"{path.name} lacks column(s) {', '.join(missing)} (has {', '.join(df.columns[:12])}): {hint}"
        )
    return df


def _parse_label_cell(cell: str, sep: str = "|") -> tuple[list[str], bool]:
    """Names in a label cell and whether the row is labelled at all (empty -> unlabelled)."""
    names = [t.strip() for t in str(cell).split(sep) if t.strip()]
    if not names:
        return [], False
    out = []
    for n in names:
        try:
            out.append(canonical(n))
        except UnknownClassError as exc:
            raise UserError(f"label '{n}' in the CSV is not a ChestX-ray14 name: {exc}") from None
    return out, True


# ---------------------------------------------------------------------------------------- folder
def list_folder(cfg: Mapping[str, Any]) -> Rows:
    """``labels.csv`` with ``file`` and ``labels`` (``|``-joined; ``Finding Labels`` accepted too),
    optional ``patient_id``, split column, ``mask`` column (our synthetic output) and a
    ``masks.csv`` (``file, mask_file, structure``) for anatomy masks."""
    root = _require_root(cfg, "folder")
    csv_name = str(cfg["labels_csv"])
    df = read_csv_checked(root / csv_name, ["file"], "the folder source needs a labels.csv with columns file and labels")
    label_col = "labels" if "labels" in df.columns else ("Finding Labels" if "Finding Labels" in df.columns else None)
    if label_col is None:
        raise UserError(f"{root / csv_name} lacks a labels column: add 'labels' (names joined by |)")
    include = list(cfg["include"] or [])
    if include:
        df = df[df["file"].map(lambda f: any(str(f).startswith(p) for p in include))]
    replace = dict(cfg["path_replace"] or {})
    files = []
    for f in df["file"]:
        for a, b in replace.items():
            if str(f).startswith(a):
                f = b + str(f)[len(a):]
        _inside(root, f)
        files.append(str(f))
    drop_unlabelled = bool(cfg["drop_unlabelled"])
    labels, keep = [], []
    for cell in df[label_col]:
        names, labelled = _parse_label_cell(cell)
        labels.append(multi_hot(names, labelled=labelled))
        keep.append(labelled or not drop_unlabelled)
    keep_arr = np.asarray(keep, dtype=bool)
    pid_col = "patient_id" if "patient_id" in df.columns else None
    pids = [p if p else f"file:{f}" for p, f in zip(df[pid_col] if pid_col else [""] * len(df), files)]
    split_col = cfg["split_column"]
    if split_col and split_col not in df.columns:
        raise UserError(f"data.split_column '{split_col}' is not a column of {csv_name}: use one of {', '.join(df.columns)}")
    official = [str(s) for s in df[split_col]] if split_col else [""] * len(df)
    lesions: dict[str, list[str | None]] = {}
    if "mask" in df.columns:  # our synthetic format: masks/<id>_<Finding>.png, '|'-joined
        for i, cell in enumerate(df["mask"]):
            for m in [t for t in str(cell).split("|") if t.strip()]:
                finding = canonical(Path(m).stem.rsplit("_", 1)[-1] if "_" in Path(m).stem else "")
                _inside(root, m)
                lesions.setdefault(finding, [None] * len(df))[i] = m
    anatomy: dict[str, list[str | None]] = {}
    masks_csv = root / str(cfg["masks_csv"])
    if masks_csv.is_file():
        mdf = read_csv_checked(masks_csv, ["file", "mask_file", "structure"], "masks.csv needs file, mask_file, structure")
        index = {f: i for i, f in enumerate(df["file"])}
        for f, m, s in zip(mdf["file"], mdf["mask_file"], mdf["structure"]):
            if f in index:
                _inside(root, m)
                col = anatomy.setdefault(str(s), [None] * len(df))
                if col[index[f]] is None:  # several annotations of one structure: keep the first
                    col[index[f]] = m
    sel = np.flatnonzero(keep_arr)
    return Rows(
        root=root,
        files=[files[i] for i in sel],
        labels=np.stack(labels)[sel] if labels else np.zeros((0, len(VOCABULARY)), np.float32),
        patient_ids=[pids[i] for i in sel],
        official=[official[i] for i in sel],
        anatomy={k: [v[i] for i in sel] for k, v in anatomy.items()},
        lesions={k: [v[i] for i in sel] for k, v in lesions.items()},
    )


# ------------------------------------------------------------------------------------------- nih
def _find_one(root: Path, patterns: list[str], what: str, hint: str) -> Path:
    for pattern in patterns:
        hits = sorted(glob.glob(str(root / pattern)))
        if hits:
            return Path(hits[-1])
    raise UserError(f"no {what} under {root}: {hint}")


def list_nih(cfg: Mapping[str, Any]) -> Rows:
    """ChestX-ray14 as NIH ships it: ``Data_Entry_2017*.csv[.gz]``, images in one folder or in
    ``images_001/images/`` ..., ``train_val_list.txt`` / ``test_list.txt`` for the official split."""
    root = _require_root(cfg, "nih")
    entry = _find_one(root, ["Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz", "*/Data_Entry_2017*.csv*"],
                      "Data_Entry_2017*.csv", "point data.root at the ChestX-ray14 download")
    df = read_csv_checked(entry, ["Image Index", "Finding Labels", "Patient ID"], "this is not a ChestX-ray14 Data_Entry file")
    dirs = [Path(str(d)).expanduser() for d in (cfg["image_dirs"] or [])]
    dirs = [d if d.is_absolute() else (root / d) for d in dirs]
    dirs += [root, root / "images", *sorted(Path(p) for p in glob.glob(str(root / "images_*" / "images")))]
    located: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for name in os.listdir(d):
                if name.endswith(".png"):
                    located.setdefault(name, d.resolve() / name)
    df = df[df["Image Index"].isin(located)]
    if df.empty:
        raise UserError(f"none of the images listed in {entry.name} were found under {root} "
                        "(looked in images/, images_*/images/ and data.image_dirs): add data.image_dirs=[...]")
    log.info("nih: %d images of %s found on disk", len(df), entry.name)
    tv = sorted(glob.glob(str(root / "*train_val_list*.txt")))
    te = sorted(glob.glob(str(root / "*test_list*.txt")))
    official = [""] * len(df)
    if tv:
        trainval = set(Path(tv[0]).read_text().split())
        test = set(Path(te[0]).read_text().split()) if te else set()
        official = ["train_val" if n in trainval else ("test" if (n in test or not te) else "") for n in df["Image Index"]]
    labels = np.stack([multi_hot(_parse_label_cell(c)[0]) for c in df["Finding Labels"]])
    return Rows(
        root=root,
        files=[str(located[n]) for n in df["Image Index"]],
        labels=labels.astype(np.float32),
        patient_ids=[f"nih-{p}" for p in df["Patient ID"]],
        official=official,
    )


def nih_boxes(root: Path) -> pd.DataFrame:
    """``BBox_List_2017.csv`` as a frame with ``Image Index, Finding Label, x, y, w, h`` (1024 px grid)."""
    path = _find_one(Path(root), ["BBox_List_2017.csv", "*/BBox_List_2017.csv"], "BBox_List_2017.csv",
                     "it ships with ChestX-ray14")
    df = pd.read_csv(path)
    cols = list(df.columns)
    df = df.rename(columns={cols[2]: "x", cols[3]: "y", cols[4]: "w", cols[5]: "h"})[
        ["Image Index", "Finding Label", "x", "y", "w", "h"]]
    df["Finding Label"] = [canonical(n) for n in df["Finding Label"]]
    return df


# -------------------------------------------------------------------------------------- chexpert
CHEXPERT_MAP = {
    "No Finding": NO_FINDING, "Cardiomegaly": "Cardiomegaly", "Edema": "Edema",
    "Consolidation": "Consolidation", "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis",
    "Pneumothorax": "Pneumothorax", "Pleural Effusion": "Effusion",
}


def list_chexpert(cfg: Mapping[str, Any]) -> Rows:
    """CheXpert ``train.csv`` / ``valid.csv``; uncertain (-1) labels by ``data.uncertain``:
    ``ones``, ``zeros`` or ``nan``. Findings CheXpert does not label are NaN. ``valid.csv`` is
    the test split; train is divided into train/val by patient."""
    root = _require_root(cfg, "chexpert")
    policy = str(cfg["uncertain"])
    if policy not in {"ones", "zeros", "nan"}:
        raise UserError(f"data.uncertain={policy} is not a policy: use ones, zeros or nan")
    unc = {"ones": 1.0, "zeros": 0.0, "nan": np.nan}[policy]
    files, labels, pids, official = [], [], [], []
    for csv_name, split in (("train.csv", ""), ("valid.csv", "test")):
        path = root / csv_name
        if not path.is_file():
            if csv_name == "train.csv":
                raise UserError(f"{path} not found: point data.root at the CheXpert folder holding train.csv")
            continue
        df = read_csv_checked(path, ["Path", *CHEXPERT_MAP], "this is not a CheXpert label file")
        for _, row in df.iterrows():
            vec = np.full(len(VOCABULARY), np.nan, dtype=np.float32)
            for col, name in CHEXPERT_MAP.items():
                cell = str(row[col]).strip()
                value = 0.0 if cell == "" else float(cell)
                vec[VOCABULARY.index(name)] = unc if value == -1 else value
            rel = str(row["Path"])
            # Paths start with the archive folder name (CheXpert-v1.0-small/train/...): resolve against root's parent if needed.
            parts = Path(rel).parts
            rel = str(Path(*parts[1:])) if parts and not (root / rel).exists() and (root / Path(*parts[1:])).exists() else rel
            _inside(root, rel)
            files.append(rel)
            labels.append(vec)
            patient = next((p for p in Path(rel).parts if p.startswith("patient")), rel)
            pids.append(f"chexpert-{patient}")
            official.append(split)
    return Rows(root=root, files=files, labels=np.stack(labels), patient_ids=pids, official=official)


# -------------------------------------------------------------------------------------- medmnist
def list_medmnist(cfg: Mapping[str, Any]) -> Rows:
    """MedMNIST ``chestmnist*.npz`` (14 ChestX-ray14 labels) or ``pneumoniamnist*.npz`` (normal vs
    pneumonia), official train/val/test splits. Without patient ids each image is its own patient."""
    root = _require_root(cfg, "medmnist")
    flavour = str(cfg["flavour"])
    hits = sorted(root.glob(f"{flavour}*.npz"))
    size = int(cfg["image_size"])
    exact = [h for h in hits if h.stem.endswith(f"_{size}")]
    if not hits:
        raise UserError(f"no {flavour}*.npz under {root}: download MedMNIST's {flavour} file there")
    path = exact[0] if exact else hits[0]
    try:
        npz = np.load(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    images, labels, official = [], [], []
    for split in ("train", "val", "test"):
        if f"{split}_images" not in npz:
            raise UserError(f"{path.name} lacks {split}_images: is it a MedMNIST file?")
        imgs = npz[f"{split}_images"]
        labs = npz[f"{split}_labels"].astype(np.float32)
        if imgs.ndim == 4:  # RGB variants: take luminance
            imgs = imgs.mean(axis=-1).astype(np.uint8)
        vec = np.full((len(imgs), len(VOCABULARY)), np.nan, dtype=np.float32)
        if flavour.startswith("chest"):
            vec[:, : len(FINDINGS)] = labs[:, : len(FINDINGS)]
            vec[:, VOCABULARY.index(NO_FINDING)] = (labs.sum(1) == 0).astype(np.float32)
        else:
            pos = labs.reshape(len(labs), -1)[:, 0]
            vec[:, VOCABULARY.index("Pneumonia")] = pos
            vec[:, VOCABULARY.index(NO_FINDING)] = 1 - pos
        images.append(imgs)
        labels.append(vec)
        official += [split] * len(imgs)
    arrays = np.concatenate(images).astype(np.uint8)
    return Rows(root=root, files=[f"{path.name}#{i}" for i in range(len(arrays))], labels=np.concatenate(labels),
                patient_ids=[f"{flavour}-{i}" for i in range(len(arrays))], official=official, arrays=arrays)


LISTERS: dict[str, Callable[[Mapping[str, Any]], Rows]] = {
    "folder": list_folder, "nih": list_nih, "chexpert": list_chexpert, "medmnist": list_medmnist,
}


# -------------------------------------------------------------------------------------- decoding
def _resize_square(img: Image.Image, size: int, resample_mask: bool = False) -> np.ndarray:
    w, h = img.size
    s = min(w, h)
    if w != h:  # centre crop to a square, as the shared set was made
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        method = Image.NEAREST if resample_mask else (Image.LANCZOS if s > size else Image.BICUBIC)
        img = img.resize((size, size), method)
    return np.asarray(img, dtype=np.uint8)


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode one image file to size x size uint8 grayscale (centre crop, then resize)."""
    with Image.open(path) as img:
        img.load()
        return _resize_square(img.convert("L"), size)


def decode_mask(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return (_resize_square(img.convert("L"), size, resample_mask=True) > 127).astype(np.uint8)


def _decode_rows(rows: Rows, size: int, on_error: str | None, show_progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image (threads); returns images and a keep mask (False where unreadable)."""
    n = len(rows.files)
    out = np.zeros((n, size, size), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    if rows.arrays is not None:
        for i in range(n):
            out[i] = _resize_square(Image.fromarray(rows.arrays[i]), size)
        return out, ok
    bad: list[str] = []

    def work(i: int) -> None:
        try:
            out[i] = decode_image(_inside(rows.root, rows.files[i]) if not os.path.isabs(rows.files[i]) else Path(rows.files[i]), size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            ok[i] = False
            bad.append(rows.files[i])

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        list(progress(pool.map(work, range(n)), total=n, desc="decode images", enabled=show_progress))
    if bad:
        first = ", ".join(sorted(bad)[:3])
        if on_error == "fail":
            raise UserError(f"{len(bad)} unreadable image(s), e.g. {first}: fix or remove them, or set data.on_error=skip")
        log.warning("skipped %d unreadable image(s), e.g. %s", len(bad), first)
    return out, ok


def _file_key(rows: Rows) -> list:
    key = []
    for f in rows.files:
        p = Path(f) if os.path.isabs(f) else rows.root / f.split("#")[0]
        try:
            st = p.stat()
            key.append((f, st.st_size, int(st.st_mtime)))
        except OSError:
            key.append((f, -1, -1))
    return key


def _build_from_rows(name: str, rows: Rows, size: int, on_error: str | None, show_progress: bool, fp: str) -> DataTable:
    images, ok = _decode_rows(rows, size, on_error, show_progress)
    sel = np.flatnonzero(ok)

    def masks(col: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        arr = np.zeros((len(sel), size, size), dtype=np.uint8)
        known = np.zeros(len(sel), dtype=bool)
        for k, i in enumerate(sel):
            if col[i]:
                try:
                    arr[k] = decode_mask(rows.root / col[i], size)
                    known[k] = True
                except (OSError, UnidentifiedImageError, ValueError):
                    log.warning("unreadable mask %s skipped", col[i])
        return arr, known

    anatomy, anatomy_known = {}, {}
    for s, col in rows.anatomy.items():
        anatomy[s], anatomy_known[s] = masks(col)
    lesions, lesion_known = {}, {}
    for f, col in rows.lesions.items():
        lesions[f], lesion_known[f] = masks(col)
    return DataTable(
        source=name, images=images[sel], labels=rows.labels[sel].astype(np.float32),
        patient_ids=np.asarray([rows.patient_ids[i] for i in sel]), splits=np.asarray([rows.official[i] for i in sel]),
        files=np.asarray([rows.files[i] for i in sel]), lesion_masks=lesions, lesion_known=lesion_known,
        anatomy=anatomy, anatomy_known=anatomy_known, fingerprint=fp,
    )


def _build_phantom(cfg: Mapping[str, Any], size: int, fp: str, show_progress: bool) -> DataTable:
    prevalence = {canonical(k): float(v) for k, v in dict(cfg["prevalence"] or {}).items()} or None
    n = int(cfg["n"])
    if n < 1:
        raise UserError(f"data.n={n}: the phantom needs at least one image (data.n=2000)")
    try:
        batch = phantom.render_many(n, seed=int(cfg["seed"]), size=size, prevalence=prevalence,
                                    healthy_fraction=float(cfg["healthy_fraction"]), progress=show_progress)
    except ValueError as exc:
        raise UserError(f"bad phantom settings: {exc}") from None
    known = np.ones(n, dtype=bool)
    return DataTable(
        source="phantom", images=batch.images, labels=batch.labels.astype(np.float32),
        patient_ids=np.asarray(batch.patient_ids), splits=np.asarray([""] * n),
        files=np.asarray(batch.patient_ids), lesion_masks=dict(batch.masks),
        lesion_known={k: known for k in batch.masks}, anatomy={"lungs": batch.lungs},
        anatomy_known={"lungs": known}, healthy=batch.healthy, fingerprint=fp,
    )


def load_table(cfg: Mapping[str, Any], *, show_progress: bool = True) -> DataTable:
    """Load a data source through the cache and assign its patient-level split.

    Args:
        cfg: the ``data`` config node (``name``, ``root``, ``image_size``, ``split``, ...).
    """
    name = str(cfg["name"])
    if name not in SOURCES:
        raise UserError(f"unknown data source '{name}': choose one of {', '.join(SOURCES)} (data=<source>)")
    size = int(cfg["image_size"])
    if size < 32 or size > 256 or size & (size - 1):
        raise UserError(f"data.image_size={size} is not supported: use a power of two from 32 to 256")
    root = cache.cache_root(cfg["cache_dir"])
    use_cache = bool(cfg["cache"])
    if name == "phantom":
        params = {k: cfg[k] for k in ("n", "seed", "prevalence", "healthy_fraction")}
        params["prevalence"] = dict(params["prevalence"] or {})
        fp = fingerprint("phantom", size, params, _phantom_version())
        table = cache.load_or_build(root, f"phantom-{fp}", lambda: _build_phantom(cfg, size, fp, show_progress), enabled=use_cache)
    else:
        rows = LISTERS[name](cfg)
        # unreadable files: skip or fail (medmnist's arrays are decoded already and have no such key)
        on_error = None if rows.arrays is not None else str(cfg["on_error"])
        if not rows.files:
            raise UserError(f"data={name} at {rows.root} selected no images: check data.include and the labels")
        fp = fingerprint(name, str(rows.root), size, _file_key(rows), sorted(rows.anatomy), sorted(rows.lesions))
        table = cache.load_or_build(root, f"{name}-{fp}",
                                    lambda: _build_from_rows(name, rows, size, on_error, show_progress, fp), enabled=use_cache)
        if on_error == "fail" and len(table) < len(rows.files):
            # a cache entry built with on_error=skip has the unreadable files dropped: fail as a fresh build would
            bad = sorted(set(rows.files) - set(table.files.tolist()))
            raise UserError(f"{len(bad)} unreadable image(s), e.g. {', '.join(bad[:3])} (skipped when the data cache was "
                            "built): fix or remove them, or set data.on_error=skip")
    split = cfg["split"]
    official = table.splits if bool(split["official"]) else None
    table.splits = split_by_patient(table.patient_ids, val=float(split["val"]),
                                    test=float(split["test"]), seed=int(split["seed"]), fixed=official)
    if len(table) == 0:
        raise UserError(f"data={name} has no readable images: check data.root")
    return table


def _phantom_version() -> str:
    """Part of the phantom cache key: a change to the renderer's code invalidates old entries."""
    return hashlib.sha256(Path(phantom.__file__).read_bytes()).hexdigest()[:12]
