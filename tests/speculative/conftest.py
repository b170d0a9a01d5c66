"""One thread for the tiny models here (the shared ``one_thread`` fixture, for every test)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one torch thread."""
