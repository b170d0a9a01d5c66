"""``slimline search``: files written, one-line errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from slimline.cli import main
from slimline.core.recipe import Recipe


def test_search_command_writes_the_front(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from slimline.evaluate import energy

    monkeypatch.setattr(energy, "MIN_SECONDS", 0.3)  # the wiring, not the figures
    space = tmp_path / "space.yaml"
    space.write_text("methods:\n  rtn: {bits: [4, 8], group_size: [64, 128]}\n")
    out = tmp_path / "out"
    code = main(["search", "--model", "digits-cnn", "--objectives", "latency,size",
                 "--constraint", "accuracy>=0.5", "--trials", "2", "--space", str(space),
                 "--batches", "1", "--batch-size", "64", "--runs", "1",
                 "--calibration-batches", "0", "--storage", f"sqlite:///{tmp_path / 's.db'}",
                 "--study", "cli", "--worker", "1", "--energy-rating", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "search.json").read_text())
    assert report["study"] == "cli" and len(report["trials"]) == 2
    recipes = sorted(out.glob("pareto-trial*.yaml"))
    assert len(recipes) == len(report["pareto"]) >= 1
    for path in recipes:
        assert all(step.method == "rtn" for step in Recipe.from_file(path))
    assert (out / "best.yaml").is_file() and (out / "pareto.md").is_file()
    chart = out / "pareto.png"
    has_plot = importlib.util.find_spec("matplotlib") is not None
    assert chart.is_file() == has_plot
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "energy rating" in printed
    rating = report["energy_rating"]
    assert [r["trial"] for r in rating["rows"]] == [None, *report["pareto"]]
    assert "Energy rating" in (out / "pareto.md").read_text()


@pytest.mark.parametrize(("argv", "message"), [
    (["--constraint", "cosine=>1"], "does not parse"),
    (["--objectives", "speed"], "unknown metric 'speed'"),
    (["--storage", "nonsense"], "not a database URL"),
])
def test_search_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    argv: list[str], message: str) -> None:
    code = main(["search", "--model", "digits-cnn", "--trials", "1", "--out", str(tmp_path),
                 "--batches", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
