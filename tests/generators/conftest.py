"""Fixtures for the generator tests (helpers live in gen_helpers.py)."""

from __future__ import annotations

import pytest
from gen_helpers import CLASSES, FakeXrays


@pytest.fixture
def classes() -> list[str]:
    return list(CLASSES)


@pytest.fixture
def dataset() -> FakeXrays:
    return FakeXrays()
