"""What the benchmark tables record about the machine they ran on (one helper for every script)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def loadavg() -> str:
    """The 1-minute load average (``/proc/loadavg``), or ``n/a``."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, logical CPUs, torch version and threads, Python version."""
    return (f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")
