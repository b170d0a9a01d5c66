"""Measure what compression bought: latency, memory, size, FLOPs, energy and quality.

``evaluate(model, data, metrics, baseline)`` returns a :class:`Report` (a JSON-serialisable
dict, schema in ARCHITECTURE.md, "Evaluation report"); the renderers turn reports, or rows
of several variants, into rich tables, Markdown, JSON files and a quality/latency chart.
"""

from __future__ import annotations

from slimline.evaluate.chart import save_chart
from slimline.evaluate.evaluator import METRICS, evaluate
from slimline.evaluate.report import (
    Report,
    Row,
    render_rows,
    render_table,
    rows_of,
    rows_to_markdown,
    to_markdown,
    write_json,
)

__all__ = [
    "METRICS",
    "Report",
    "Row",
    "evaluate",
    "render_rows",
    "render_table",
    "rows_of",
    "rows_to_markdown",
    "save_chart",
    "to_markdown",
    "write_json",
]
