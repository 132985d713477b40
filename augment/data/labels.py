"""The label vocabulary: the 14 ChestX-ray14 findings plus ``No Finding``.

Labels are multi-hot float vectors over a list of class names: 1 = present, 0 = absent,
NaN = "not labelled by this source". Losses and AUCs skip NaN.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
VOCABULARY: tuple[str, ...] = (*FINDINGS, NO_FINDING)

# Lower-cased, separator-free spellings -> canonical name.  Canonical names themselves are
# added below, so only genuine aliases are listed here.
_ALIASES: dict[str, str] = {
    "pleuraleffusion": "Effusion",
    "effusions": "Effusion",
    "pleuralthickening": "Pleural_Thickening",
    "infiltrate": "Infiltration",  # the spelling of NIH's BBox_List_2017.csv
    "infiltrates": "Infiltration",
    "nodules": "Nodule",
    "masses": "Mass",
    "pulmonaryedema": "Edema",
    "oedema": "Edema",
    "hiatalhernia": "Hernia",
    "hiatushernia": "Hernia",
    "enlargedheart": "Cardiomegaly",
    "normal": NO_FINDING,
    "nofinding": NO_FINDING,
    "healthy": NO_FINDING,
    "none": NO_FINDING,
}


class UnknownClassError(ValueError):
    """A class name that is not in the vocabulary; the message lists the valid names."""


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


_LOOKUP: dict[str, str] = {_key(n): n for n in VOCABULARY} | _ALIASES


def canonical(name: str) -> str:
    """Return the canonical spelling of a class name (case-insensitive, aliases allowed).

    Raises:
        UnknownClassError: naming the closest valid name and listing them all.
    """
    key = _key(name)
    if key in _LOOKUP:
        return _LOOKUP[key]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.5)
    hint = f"did you mean '{_LOOKUP[close[0]]}'? " if close else ""
    raise UnknownClassError(
        f"unknown class '{name}': {hint}valid names are {', '.join(VOCABULARY)}"
    )


def parse_classes(spec: str | Iterable[str] | None) -> list[str]:
    """Parse ``"edema,hernia"`` or a list of names into canonical names, order kept, no repeats."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    out: list[str] = []
    for item in items:
        if item.strip():
            name = canonical(item)
            if name not in out:
                out.append(name)
    return out


def parse_finding_labels(text: str | float | None, sep: str = "|") -> list[str]:
    """Parse an NIH ``Finding Labels`` cell (``"Effusion|Mass"``); empty or NaN gives ``[]``."""
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return []
    return [canonical(t) for t in str(text).split(sep) if t.strip()]


def multi_hot(names: Sequence[str], classes: Sequence[str] = VOCABULARY, *, labelled: bool = True) -> np.ndarray:
    """Multi-hot float32 vector over ``classes``.

    ``No Finding`` in ``names`` means every finding is absent.  With ``labelled=False`` (the
    source gives no usable label for this image) every entry is NaN.
    """
    vec = np.zeros(len(classes), dtype=np.float32)
    if not labelled:
        vec[:] = np.nan
        return vec
    index = {c: i for i, c in enumerate(classes)}
    present = set(names)
    for name in present:
        if name in index:
            vec[index[name]] = 1.0
    if NO_FINDING in index and not (present - {NO_FINDING}):
        vec[index[NO_FINDING]] = 1.0 if present or labelled else np.nan
    return vec


def finding_string(vec: np.ndarray, classes: Sequence[str] = VOCABULARY) -> str:
    """NIH ``Finding Labels`` text for a multi-hot vector (``No Finding`` when nothing is set)."""
    names = [c for c, v in zip(classes, vec) if v == 1 and c != NO_FINDING]
    return "|".join(names) if names else NO_FINDING
