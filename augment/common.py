"""Helpers below the stages (every stage, the pipeline, search and the report use them): class
selection, JSON and table output, versions."""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from augment.data.labels import NO_FINDING, UnknownClassError, parse_classes
from augment.data.table import DataTable
from augment.errors import UserError


def resolve_classes(spec: Sequence[str] | str | None, table: DataTable | None = None, *,
                    allow_no_finding: bool = True) -> list[str]:
    """Canonical class list from the config/CLI; checks the data labels them.

    Empty ``spec`` means every class the data has positives for (``No Finding`` excluded).
    Without ``table`` only the names are checked (call it before slow work).
    """
    try:
        classes = parse_classes(spec)
    except UnknownClassError as exc:
        raise UserError(str(exc)) from None
    if not allow_no_finding:
        classes = [c for c in classes if c != NO_FINDING]
    if table is None:
        return classes
    if table is not None:
        present = table.labelled_classes()
        if not classes:
            classes = [c for c in present if c != NO_FINDING]
        missing = [c for c in classes if c not in present]
        if missing:
            have = ", ".join(c for c in present if c != NO_FINDING) or "none"
            raise UserError(
                f"class(es) {', '.join(missing)} have no positive image in data={table.source}: "
                f"choose from {have} (--classes ...)"
            )
    if not classes:
        raise UserError("no classes selected: pass --classes edema,hernia (or classes=[...])")
    return classes


def versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    out = {"python": platform.python_version()}
    for pkg in ("augment", "torch", "torchvision", "timm", "pytorch-fid", "ray", "optuna", "hydra-core", "numpy", "scikit-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (NaN/inf become null)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def print_table(rows: list[list[Any]], header: list[str], file=None) -> str:
    """Plain-text table (also returned as a string)."""
    cells = [[str(h) for h in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text, file=file if file is not None else sys.stdout)
    return text


def markdown_table(rows: list[list[Any]], header: list[str]) -> str:
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)
