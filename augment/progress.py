"""Progress of long stages: the in-process bar is :func:`cxrbase.progress` (quiet when stderr is not a
terminal); :class:`StepWatcher` follows work running elsewhere (Ray actors) from its logs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from cxrbase.progress import interactive, progress

__all__ = ["StepWatcher", "interactive", "last_step", "progress"]


def last_step(log: Path) -> int:
    """The ``step`` of the last complete JSON line of a training log (0 when none yet)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue
    return 0


class StepWatcher:
    """Driver-side progress of work running elsewhere (Ray actors): one bar per unit, fed by the
    ``step`` of the last line of each unit's ``metrics.jsonl``.

    On a terminal it draws tqdm bars; otherwise (logs, CI) it prints one status line every
    ``every_s`` seconds, so a long stage is never silent.
    """

    def __init__(self, units: dict[str, tuple[Path | None, int]], *, desc: str, enabled: bool = True,
                 every_s: float = 60.0, clock=time.monotonic) -> None:
        self.units = units  # name -> (metrics.jsonl or None when the unit has no step log, total steps)
        self.desc, self.every_s, self.clock = desc, every_s, clock
        self.enabled = enabled
        self.bars: dict[str, Any] = {}
        self.last_print = clock()
        if enabled and interactive():
            for pos, (name, (_, total)) in enumerate(units.items()):
                self.bars[name] = tqdm(total=total or None, desc=f"{desc} {name}", position=pos, leave=False,
                                       dynamic_ncols=True)

    def steps(self) -> dict[str, int]:
        return {name: (last_step(log) if log is not None else 0) for name, (log, _) in self.units.items()}

    def line(self) -> str:
        parts = []
        for name, step in self.steps().items():
            total = self.units[name][1]
            parts.append(f"{name} {step}/{total}" if self.units[name][0] is not None else f"{name} running")
        return f"{self.desc}: " + ", ".join(parts)

    def __call__(self) -> None:
        if not self.enabled:
            return
        if self.bars:
            for name, step in self.steps().items():
                bar = self.bars[name]
                if step > bar.n:
                    bar.update(step - bar.n)
            return
        now = self.clock()
        if now - self.last_print >= self.every_s:
            self.last_print = now
            print(self.line(), flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}
