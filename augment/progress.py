"""One progress-bar helper for every long stage; quiet when stderr is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """Wrap an iterable in a tqdm bar when ``enabled`` and stderr is a terminal."""
    if not (enabled and interactive()):
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
