"""Shared fixtures: the real data beside the project, a private cache per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CXR_REAL = SHARED / "data" / "cxr-real"

# Tests use small thread pools: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session gets its own data cache so tests never see a user's cache."""
    os.environ["AUGMENT_CACHE_DIR"] = str(tmp_path_factory.mktemp("augment-cache"))


@pytest.fixture
def cxr_real() -> Path:
    if not (CXR_REAL / "labels.csv").is_file():
        pytest.skip("../shared/data/cxr-real is not beside the project")
    return CXR_REAL

