"""One progress-bar helper for every long loop; quiet when stderr is not a terminal or under CI.

The bar is ``tqdm.std.tqdm``, not ``tqdm.auto.tqdm``: the latter (``tqdm.asyncio``) calls
``iter(iterable)`` in its constructor and throws that iterator away, and a ``DataLoader`` iterator
draws its base seed from the loader's generator (or the global torch RNG) when created. Wrapping a
loader with :func:`progress` therefore never changes which batches or random numbers follow,
whether or not a terminal is attached.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm


def interactive() -> bool:
    """True when stderr is a terminal and the ``CI`` environment variable is unset (or empty)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(callable(isatty) and isatty()) and not os.environ.get("CI")


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` and :func:`interactive`, else ``iterable`` itself."""
    if not (enabled and interactive()):
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def bar(total: int | None, *, initial: int = 0, desc: str = "", enabled: bool = True) -> Any:
    """A tqdm bar for loops that call ``update`` by hand; disabled (a no-op) when not interactive."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and interactive()),
        leave=False,
        dynamic_ncols=True,
    )


__all__ = ["bar", "interactive", "progress"]
