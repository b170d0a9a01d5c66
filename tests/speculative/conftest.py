"""One thread for the tiny models here: on a shared 2-core machine a second thread only adds
contention to forwards of a few microseconds' work (measured: 6 ms vs 176 ms per forward)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
