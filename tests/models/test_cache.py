from __future__ import annotations

from pathlib import Path

import pytest

from slimline.models.cache import CACHE_ENV, cache_root, cached_dir, is_cached


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == tmp_path / "xdg" / "slimline"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "slimline"


def test_build_once_then_hit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "payload.json").write_text("{}")

    first = cached_dir("thing-v1", build)
    second = cached_dir("thing-v1", build)
    assert first == second == tmp_path / "thing-v1"
    assert len(calls) == 1 and calls[0] != first  # built elsewhere, then renamed into place
    assert (first / "payload.json").is_file() and is_cached("thing-v1")


def test_interrupted_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def broken(out: Path) -> None:
        (out / "half.bin").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dir("thing-v1", broken)
    assert list(tmp_path.iterdir()) == []
    assert not is_cached("thing-v1")


@pytest.mark.parametrize("key", ["", "a/b", ".hidden"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="cache key"):
        cached_dir(key, lambda out: None)
