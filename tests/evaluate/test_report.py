"""Renderers: tables, Markdown, atomic JSON, the chart."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from rich.console import Console

from slimline.evaluate import (
    Report,
    render_rows,
    render_table,
    rows_of,
    rows_to_markdown,
    save_chart,
    to_markdown,
    write_json,
)
from slimline.evaluate.report import format_ratio, format_value

REPORT = Report(
    conditions={"device": "cpu", "cpu": "Test CPU", "cpu_features": ["avx2"], "threads": 2,
                "torch": "2.x", "batch_size": 8, "seq_len": 128, "runs": 10},
    models={
        "baseline": {"latency_ms_median": 20.0, "size_bytes_memory": 400_000_000,
                     "perplexity": 10.0, "flops": 3e9, "sparsity": 0.0},
        "model": {"latency_ms_median": 10.0, "size_bytes_memory": 100_000_000,
                  "perplexity": 10.5, "flops": 3e9, "sparsity": 0.5, "cosine": 0.99},
    },
)


def _text(renderable: object) -> str:
    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_render_table_side_by_side_with_ratio() -> None:
    text = _text(render_table(REPORT))
    assert "× baseline" in text
    assert "20.0 ms" in text and "10.0 ms" in text and "0.50×" in text
    assert "400 MB" in text and "0.25×" in text
    assert "3 GFLOP" in text and "50.00 %" in text
    assert "Test CPU · 2 threads · torch 2.x · batch 8 × 128 tokens" in text  # the caption
    assert "10 runs" in text


def test_to_markdown_has_conditions_and_a_row_per_metric() -> None:
    markdown = to_markdown(REPORT)
    assert markdown.startswith("Conditions: Test CPU")
    assert "| metric | baseline | model | × baseline |" in markdown
    assert "| latency median | 20.0 ms | 10.0 ms | 0.50× |" in markdown
    assert "| cosine vs baseline | — | 0.99000 |  |" in markdown


def test_render_rows_compares_variants_with_a_reference_and_shows_failures() -> None:
    rows = [*rows_of(REPORT), ("peer", {"error": "ImportError: no torchao"})]
    markdown = rows_to_markdown(rows, reference="baseline")
    assert "| model | latency median | size in memory |" in markdown
    assert "10.0 ms (0.50×)" in markdown
    assert "| peer | — | — |" in markdown and "ImportError: no torchao" in markdown
    assert "note" in _text(render_rows(rows, reference="baseline", title="variants"))
    with pytest.raises(ValueError, match="reference"):
        render_rows(rows, reference="nope")


def test_formatting_units() -> None:
    assert format_value("size_bytes_memory", 840) == "840 B"
    assert format_value("peak_memory_bytes", 2_500_000) == "2.5 MB"
    assert format_value("params", 1_234_567) == "1.23 M"
    assert format_value("energy_source", "estimate") == "estimate"
    assert format_value("perplexity", None) == "—"
    assert format_ratio("sparsity", 0.5, 0.1) == ""
    assert format_ratio("latency_ms_median", 5.0, 0.0) == ""


def test_write_json_is_atomic_and_round_trips(tmp_path: Path) -> None:
    path = write_json(REPORT, tmp_path / "out" / "report.json")
    assert json.loads(path.read_text()) == REPORT
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_save_chart_writes_a_png(tmp_path: Path) -> None:
    path = save_chart(REPORT, tmp_path / "chart.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [("a", {"latency_ms_median": 3.0, "cosine": 0.9}), ("b", {"latency_ms_median": 1.0})]
    save_chart(rows, tmp_path / "rows.png", reference="b")  # b drawn at cosine 1.0
    with pytest.raises(ValueError, match="no row"):
        save_chart([("a", {"cosine": 0.9})], tmp_path / "none.png")
