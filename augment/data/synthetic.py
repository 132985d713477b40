"""The synthetic dataset format: its writer (what ``augment generate`` finishes with) and its reader,
a plain torch Dataset, sharing one set of column names.

The folder format (ARCHITECTURE.md)::

    <root>/images/<id>.png            1-channel uint8
    <root>/masks/<id>_<Finding>.png   1-channel 0/255, one per finding the image is labelled with
    <root>/labels.csv                 NIH's Data_Entry_2017 columns (Image Index, Finding Labels,
                                      Follow-up #, Patient ID, Patient Age, Patient Gender, View
                                      Position, OriginalImage[Width, Height], OriginalImagePixelSpacing
                                      [x, y]), then file, mask ('|'-joined paths relative to root, may
                                      be empty), p_<Finding>, generator, seed
    <root>/dataset.json               card: classes, counts, threshold, checkpoints, config, ...

Items are dicts: ``image`` uint8 tensor 1 x H x W (or ``transform(PIL image)`` when a transform is
given), ``labels`` float32 over ``classes`` (1 / 0 / NaN), ``probs`` float32 over ``classes`` (the
``p_`` columns; NaN where a class has none), ``masks`` uint8 C x H x W in {0, 1} (zeros for a
class without a mask; never transformed) when ``with_masks``, plus ``index`` and ``id``. Images
stay uint8 here; the classifier loop turns them into ``x = image / 127.5 - 1`` in [-1, 1].

Labels come from ``Finding Labels`` unless a pseudo-label threshold ``t`` is given: then a class
is 1 when ``p_class >= t``; below ``t`` a class the set labelled positive is NaN (rejected at ``t``:
unlabelled, never a negative) and a class it labelled negative stays 0. Computed at load time so a
search can tune ``t`` without regenerating images.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset

from augment.common import write_json
from augment.data.labels import (NO_FINDING, VOCABULARY, canonical, finding_string, multi_hot, parse_classes,
                                 parse_finding_labels)

log = logging.getLogger(__name__)

FORMAT = "augment synthetic dataset v1"
# labels.csv columns (NIH's first: ChestX-ray14 loaders read the file as is)
IMAGE_INDEX, FINDING_LABELS, PATIENT_ID = "Image Index", "Finding Labels", "Patient ID"
FOLLOW_UP, AGE, GENDER, VIEW = "Follow-up #", "Patient Age", "Patient Gender", "View Position"
# Data_Entry_2017 spells two pairs as four columns (a comma inside the bracket): kept as NIH writes them
WIDTH, HEIGHT, SPACING_X, SPACING_Y = "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"
NIH_COLUMNS = (IMAGE_INDEX, FINDING_LABELS, FOLLOW_UP, PATIENT_ID, AGE, GENDER, VIEW, WIDTH, HEIGHT, SPACING_X, SPACING_Y)
FILE, MASK, GENERATOR, SEED = "file", "mask", "generator", "seed"
PROB_PREFIX = "p_"
REQUIRED_COLUMNS = (IMAGE_INDEX, FINDING_LABELS, FILE)


def view_position(config: dict) -> str:
    """The ``View Position`` of a set: the view of the images its generator was trained on, when the
    data source says (``data.view_position``; the phantom draws PA radiographs); else empty (unknown)."""
    data = (config or {}).get("data") or {}
    if data.get("view_position"):
        return str(data["view_position"])
    return "PA" if data.get("name") == "phantom" else ""


def write_dataset(out: Path, shards: Path, rows: list[dict], classes: list[str], *, generator: str, seed: int,
                  counts: dict[str, int], rejected: int, threshold: float, config: dict, versions: dict,
                  checkpoints: dict, timings: dict) -> dict:
    """Finish a synthetic dataset folder from complete shards: move the kept files out of ``shards``,
    write labels.csv and dataset.json, drop the shards.

    ``rows``: the kept samples in order, each ``{"id", "attempt", "labels", "probs", "masks", "shard"}``
    (files relative to their shard folder). labels.csv starts with NIH's Data_Entry_2017 columns, so
    ChestX-ray14 loaders read it as is, with honest values: each image is its own patient's first
    image (Follow-up # 0, Patient ID the image id), age, sex and pixel spacing unknown (empty cells),
    the view of the training data (:func:`view_position`), the written image's size. Idempotent: a write interrupted half-way is completed by
    calling it again (``augment generate --resume``). Returns the card (dataset.json).
    """
    (out / "images").mkdir(exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    table = []
    view = view_position(config)
    for r in rows:
        src = shards / r["shard"]
        for rel in [f"images/{r['id']}.png", *r["masks"]]:
            if (src / rel).exists():
                os.replace(src / rel, out / rel)
        vec = np.array([1.0 if c in r["labels"] else 0.0 for c in classes])
        with Image.open(out / "images" / f"{r['id']}.png") as im:
            width, height = im.size
        table.append({IMAGE_INDEX: f"{r['id']}.png", FINDING_LABELS: finding_string(vec, classes), FOLLOW_UP: 0,
                      PATIENT_ID: r["id"], AGE: "", GENDER: "", VIEW: view, WIDTH: width, HEIGHT: height,
                      SPACING_X: "", SPACING_Y: "", FILE: f"images/{r['id']}.png", MASK: "|".join(r["masks"]),
                      **{f"{PROB_PREFIX}{c}": round(float(p), 6) for c, p in zip(classes, r["probs"])},
                      GENERATOR: generator, SEED: f"{int(seed)}:{r['attempt']}"})
    columns = [*NIH_COLUMNS, FILE, MASK, *[f"{PROB_PREFIX}{c}" for c in classes], GENERATOR, SEED]
    df = pd.DataFrame(table, columns=columns).sort_values(IMAGE_INDEX, kind="stable")
    tmp = out / ".labels.csv.tmp"
    df.to_csv(tmp, index=False)
    os.replace(tmp, out / "labels.csv")
    card = {"format": FORMAT, "n": sum(counts.values()), "classes": classes, "counts": counts, "rejected": rejected,
            "threshold": threshold, "image_size": None, "checkpoints": checkpoints, "config": config,
            "versions": versions, "timings": timings}
    if table:
        with Image.open(out / table[0][FILE]) as im:
            card["image_size"] = im.size[0]
    write_json(out / "dataset.json", card)
    shutil.rmtree(shards, ignore_errors=True)
    return card


def _mask_class(mask_path: str, image_id: str) -> str:
    """Finding named by a mask file ``<id>_<Finding>.png``."""
    stem = Path(mask_path).stem
    if stem.startswith(image_id + "_"):
        return canonical(stem[len(image_id) + 1 :])
    for name in sorted(VOCABULARY, key=len, reverse=True):  # Pleural_Thickening before Thickening-like tails
        if stem.lower().endswith("_" + name.lower()):
            return name
    raise ValueError(f"mask file {mask_path} does not end in _<Finding>.png")


class SyntheticDataset(Dataset):
    """A synthetic dataset folder as a torch Dataset.

    Args:
        root: the folder written by ``augment generate`` (or anything in the same format).
        transform: applied to the PIL image (mode ``L``) in place of the uint8 tensor, e.g.
            ``torchvision.transforms.ToTensor()``; masks are not transformed.
        classes: label order (names or aliases); default: ``classes`` of ``dataset.json``, else
            the ``p_`` columns of ``labels.csv``.
        threshold: pseudo-label threshold ``t`` in [0, 1]; None uses ``Finding Labels``.
        with_masks: include ``masks`` in items.

    Attributes:
        root, classes, threshold, card (the parsed ``dataset.json``, ``{}`` when absent),
        ids, files (absolute image paths), labels (N x C float32), probs (N x C float32),
        generators and seeds (per row, from the CSV when present).

    Raises:
        ValueError: one line naming the folder and what is missing or wrong (folder, labels.csv,
            columns, image or mask files, unknown class names, a bad threshold).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | str | None = None,
        threshold: float | None = None,
        with_masks: bool = True,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.transform = transform
        self.with_masks = with_masks
        where = f"synthetic dataset {self.root}"
        if not self.root.is_dir():
            raise ValueError(f"{where}: folder does not exist (run `augment generate` or check the path)")
        csv = self.root / "labels.csv"
        if not csv.is_file():
            raise ValueError(f"{where}: labels.csv is missing (not a synthetic dataset folder?)")
        self.card = self._read_card(where)
        try:
            table = pd.read_csv(csv, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: labels.csv cannot be parsed: {str(exc).splitlines()[0]}") from None
        needed = [*REQUIRED_COLUMNS, *([MASK] if with_masks else [])]
        missing = [c for c in needed if c not in table.columns]
        if missing:
            raise ValueError(f"{where}: labels.csv lacks column(s) {', '.join(missing)}")

        self.ids = [Path(v).stem if v else "" for v in table[IMAGE_INDEX]]
        self.files = []
        for row, rel in enumerate(table[FILE]):
            if not rel.strip():
                raise ValueError(f"{where}: labels.csv row {row + 2} has an empty file column")
            self.files.append(self._inside(rel.strip(), where))
        absent = [f for f in self.files if not f.is_file()]
        if absent:
            raise ValueError(f"{where}: {len(absent)} image file(s) missing, first {absent[0].relative_to(self.root)}")

        try:
            self._findings = [parse_finding_labels(v) for v in table[FINDING_LABELS]]
        except ValueError as exc:
            raise ValueError(f"{where}: labels.csv Finding Labels: {exc}") from None
        # Probabilities per canonical class, from every p_ column in the CSV.
        self._p: dict[str, np.ndarray] = {}
        for col in table.columns:
            if col.startswith(PROB_PREFIX):
                try:
                    name = canonical(col[len(PROB_PREFIX) :])
                except ValueError as exc:
                    raise ValueError(f"{where}: labels.csv column {col}: {exc}") from None
                self._p[name] = pd.to_numeric(table[col], errors="coerce").to_numpy(np.float32)

        self._masks: list[dict[str, Path]] = []
        if with_masks:
            for row, (cell, image_id) in enumerate(zip(table[MASK], self.ids)):
                found: dict[str, Path] = {}
                for rel in (p.strip() for p in cell.split("|")):
                    if not rel:
                        continue
                    try:
                        name = _mask_class(rel, image_id)
                    except ValueError as exc:
                        raise ValueError(f"{where}: labels.csv row {row + 2}: {exc}") from None
                    path = self._inside(rel, where)
                    if not path.is_file():
                        raise ValueError(f"{where}: mask file {rel} is missing")
                    found[name] = path
                self._masks.append(found)
        self.generators = list(table[GENERATOR]) if GENERATOR in table.columns else [""] * len(table)
        self.seeds = [int(s) if s.strip().lstrip("-").isdigit() else None for s in table[SEED]] \
            if SEED in table.columns else [None] * len(table)

        if classes is None:
            card_classes = self.card.get("classes")
            if card_classes:
                names = card_classes if isinstance(card_classes, (list, str)) else list(card_classes)
            elif self._p:
                names = list(self._p)
            else:
                raise ValueError(f"{where}: no classes (dataset.json has none and labels.csv has no p_ columns); pass classes=")
        else:
            names = classes
        try:
            self.classes: list[str] = parse_classes(names)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        self.threshold: float | None = None
        self._set_labels(threshold, where)

    def _inside(self, rel: str, where: str) -> Path:
        """``root / rel``, refused when it leaves the folder (``../``, an absolute path, a symlink out):
        a labels.csv from elsewhere must not make the reader open files outside the set."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{where}: labels.csv names '{rel}', which is outside the folder; "
                             "paths must be relative to the set (images/..., masks/...)")
        return path

    def _read_card(self, where: str) -> dict[str, Any]:
        path = self.root / "dataset.json"
        if not path.is_file():
            log.warning("%s: dataset.json is missing; classes come from labels.csv", where)
            return {}
        try:
            card = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{where}: dataset.json is not valid JSON ({exc})") from None
        if not isinstance(card, dict):
            raise ValueError(f"{where}: dataset.json must hold a JSON object")
        return card

    def _set_labels(self, threshold: float | None, where: str) -> None:
        n, c = len(self.files), len(self.classes)
        probs = np.full((n, c), np.nan, dtype=np.float32)
        for k, name in enumerate(self.classes):
            if name in self._p:
                probs[:, k] = self._p[name]
        if threshold is None:
            labels = np.stack([multi_hot(f, self.classes) for f in self._findings]) if n else np.zeros((0, c), np.float32)
        else:
            try:
                t = float(threshold)
            except (TypeError, ValueError):
                t = math.nan
            if not 0.0 <= t <= 1.0:  # NaN fails too
                raise ValueError(f"{where}: threshold must be in [0, 1], got {threshold!r}")
            lacking = [k for k in self.classes if k not in self._p and k != NO_FINDING]
            if lacking:
                raise ValueError(f"{where}: labels.csv has no p_ column for {', '.join(lacking)}, "
                                 "so a threshold cannot label it")
            # p >= t: positive. p < t for a class the set labelled positive (Finding Labels): rejected at t,
            # so unlabelled (NaN), never a negative. p < t for a class the set labelled negative: stays 0.
            written = np.stack([multi_hot(f, self.classes) for f in self._findings]) if n else np.zeros((0, c), np.float32)
            labels = np.where(probs >= t, 1.0, np.where(written == 1, np.nan, 0.0))
            labels[np.isnan(probs)] = np.nan
            labels = labels.astype(np.float32)
            if NO_FINDING in self.classes and NO_FINDING not in self._p:
                any_pos = np.zeros(n, dtype=bool)
                rejected = np.zeros(n, dtype=bool)  # a written finding below t: whether the image is normal is unknown
                for k, v in self._p.items():
                    if k == NO_FINDING:
                        continue
                    pos = np.nan_to_num(v, nan=0.0) >= t
                    any_pos |= pos
                    was = np.asarray([k in f for f in self._findings], dtype=bool)
                    rejected |= was & ~pos
                nf = (~any_pos).astype(np.float32)
                nf[rejected & ~any_pos] = np.nan
                labels[:, self.classes.index(NO_FINDING)] = nf
            threshold = t
        self.threshold = threshold
        self.probs = probs
        self.labels = labels.astype(np.float32)

    def relabel(self, threshold: float | None, classes: Sequence[str] | str | None = None) -> SyntheticDataset:
        """A new view of the same files with labels from ``threshold`` (and optionally ``classes``).

        Nothing is re-read from disk except when items are loaded; images are untouched.
        """
        view = copy.copy(self)
        if classes is not None:
            view.classes = parse_classes(classes)
        view._set_labels(threshold, f"synthetic dataset {self.root}")
        return view

    def label_matrix(self) -> np.ndarray:
        """len(self) x C labels (NaN kept), e.g. for class-balanced sampling."""
        return self.labels

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as img:
                img.load()
                return img if img.mode == "L" else img.convert("L")
        except (OSError, ValueError) as exc:
            raise ValueError(f"synthetic dataset {self.root}: cannot read {path.relative_to(self.root)}: {exc}") from None

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        img = self._load(self.files[i])
        array = np.asarray(img, dtype=np.uint8)
        item: dict[str, Any] = {
            "image": self.transform(img) if self.transform is not None else torch.from_numpy(array.copy())[None],
            "labels": torch.from_numpy(self.labels[i].copy()),
            "probs": torch.from_numpy(self.probs[i].copy()),
            "index": i,
            "id": self.ids[i],
        }
        if self.with_masks:
            h, w = array.shape
            masks = np.zeros((len(self.classes), h, w), dtype=np.uint8)
            for k, name in enumerate(self.classes):
                path = self._masks[i].get(name)
                if path is not None:
                    m = np.asarray(self._load(path), dtype=np.uint8)
                    if m.shape != (h, w):
                        raise ValueError(f"synthetic dataset {self.root}: mask {path.name} is {m.shape}, image is {(h, w)}")
                    masks[k] = m > 127
            item["masks"] = torch.from_numpy(masks)
        return item

    def __repr__(self) -> str:
        return (f"SyntheticDataset(root={str(self.root)!r}, n={len(self)}, classes={self.classes}, "
                f"threshold={self.threshold})")


__all__ = ["FORMAT", "NIH_COLUMNS", "PROB_PREFIX", "REQUIRED_COLUMNS", "SyntheticDataset", "view_position", "write_dataset"]
