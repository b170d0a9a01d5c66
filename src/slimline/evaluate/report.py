"""The evaluation report and its renderings: JSON, rich tables, Markdown.

A :class:`Report` is the dict ARCHITECTURE.md specifies::

    {"conditions": {...}, "models": {"baseline": {...}, "model": {...}}}

Two table layouts:

- :func:`render_table` / :func:`to_markdown` show one report: a row per metric, the
  baseline and the model side by side, and the model's value as a multiple of the baseline's.
- :func:`render_rows` / :func:`rows_to_markdown` show several variants (e.g. a benchmark
  comparing compression recipes and peer libraries): a row per variant, a column per metric.
  A row is ``(name, figures)``, where ``figures`` holds per-model report keys; a row whose
  figures carry ``"error"`` (a peer that failed) shows the error in a "note" column.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

Row = tuple[str, Mapping[str, Any]]


class Report(dict[str, Any]):
    """The result of :func:`slimline.evaluate`: a plain, JSON-serialisable dict."""

    @property
    def conditions(self) -> dict[str, Any]:
        """How the figures were measured (machine, threads, batch, runs, methods)."""
        return self["conditions"]  # type: ignore[no-any-return]

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        """Figures per model name ("baseline" when one was given, and "model")."""
        return self["models"]  # type: ignore[no-any-return]

    def rows(self) -> list[Row]:
        """The report's models as rows for :func:`render_rows` ("baseline" first)."""
        return rows_of(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self, indent=indent, allow_nan=True)


def rows_of(report: Mapping[str, Any]) -> list[Row]:
    """``[(name, figures), ...]`` for the models of a report, baseline first."""
    models: Mapping[str, Mapping[str, Any]] = report["models"]
    order = sorted(models, key=lambda name: (name != "baseline", name != "model", name))
    return [(name, models[name]) for name in order]


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report`` as JSON atomically (a temporary file renamed into place)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2)
            file.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# --- how each per-model key is shown ---------------------------------------------------


def _fmt_ms(v: float) -> str:
    return f"{v:.3g} ms" if v < 10 else f"{v:,.1f} ms"


def _fmt_bytes(v: float) -> str:
    return _scaled(v, "B", ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")))


def _fmt_flops(v: float) -> str:
    return _scaled(v, "FLOP", ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP")))


def _fmt_count(v: float) -> str:
    return _scaled(v, "", ((1e9, "G"), (1e6, "M"), (1e3, "k"))).strip()


def _scaled(v: float, unit: str, steps: Sequence[tuple[float, str]]) -> str:
    for size, name in steps:
        if abs(v) >= size:
            return f"{v / size:.3g} {name}"
    return f"{v:.3g} {unit}"


def _fmt_percent(v: float) -> str:
    return f"{v * 100:.2f} %"


@dataclass(frozen=True)
class Column:
    """How one per-model key is labelled and formatted; ``ratio``: show model/baseline."""

    label: str
    fmt: Callable[[float], str]
    ratio: bool = True


COLUMNS: dict[str, Column] = {
    "latency_ms_median": Column("latency median", _fmt_ms),
    "latency_ms_p95": Column("latency p95", _fmt_ms),
    "throughput_items_per_s": Column("throughput", lambda v: f"{v:,.1f} items/s"),
    "generate_tokens_per_s": Column("greedy generate", lambda v: f"{v:,.1f} tokens/s"),
    "acceptance_rate": Column("draft acceptance", _fmt_percent, ratio=False),
    "tokens_per_target_forward": Column("tokens / target forward", lambda v: f"{v:.2f}",
                                        ratio=False),
    "peak_memory_bytes": Column("peak memory", _fmt_bytes),
    "peak_memory_bytes_process": Column("peak memory, whole process", _fmt_bytes),
    "size_bytes_memory": Column("size in memory", _fmt_bytes),
    "size_bytes_disk": Column("size on disk", _fmt_bytes),
    "params": Column("parameters", _fmt_count),
    "sparsity": Column("sparsity", _fmt_percent, ratio=False),
    "flops": Column("FLOPs per batch", _fmt_flops),
    "energy_kwh": Column("energy / 1000 items", lambda v: f"{v * 1e3:.3g} Wh"),
    "co2_g": Column("CO2e / 1000 items", lambda v: f"{v:.3g} g"),
    "energy_source": Column("energy source", str, ratio=False),
    "perplexity": Column("perplexity", lambda v: f"{v:.3f}"),
    "accuracy": Column("accuracy", _fmt_percent),
    "cosine": Column("cosine vs baseline", lambda v: f"{v:.5f}", ratio=False),
    "kl": Column("KL vs baseline", lambda v: f"{v:.4g}", ratio=False),
    "top1_agreement": Column("top-1 agreement", _fmt_percent, ratio=False),
}


def format_value(key: str, value: Any) -> str:
    """``value`` of per-model key ``key`` in human units (ms, MB, GFLOP, %)."""
    if value is None:
        return "—"
    column = COLUMNS.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if math.isnan(value):
        return "n/a"
    return column.fmt(value) if column else f"{value:.4g}"


def format_ratio(key: str, value: Any, reference: Any) -> str:
    """``value / reference`` as "0.52×", or "" where a ratio means nothing."""
    column = COLUMNS.get(key)
    if column is None or not column.ratio:
        return ""
    if not _is_number(value) or not _is_number(reference) or reference == 0:
        return ""
    return f"{value / reference:.2f}×"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _keys_present(figure_sets: Sequence[Mapping[str, Any]]) -> list[str]:
    """Known keys in canonical order, then unknown ones (except "error"), as they come."""
    present = {key for figures in figure_sets for key in figures}
    extra = [k for figures in figure_sets for k in figures if k not in COLUMNS and k != "error"]
    return [k for k in COLUMNS if k in present] + list(dict.fromkeys(extra))


def conditions_line(conditions: Mapping[str, Any]) -> str:
    """One line naming the machine, threads, torch, batch and runs (MEASURING.md)."""
    parts = [str(conditions.get("gpu") or conditions.get("cpu", "unknown device"))]
    if "threads" in conditions:
        parts.append(f"{conditions['threads']} threads")
    if "torch" in conditions:
        parts.append(f"torch {conditions['torch']}")
    if "batch_size" in conditions:
        batch = f"batch {conditions['batch_size']}"
        if "seq_len" in conditions:
            batch += f" × {conditions['seq_len']} tokens"
        parts.append(batch)
    if "runs" in conditions:
        parts.append(f"{conditions['runs']} runs")
    if "peak_memory_method" in conditions:
        parts.append(f"peak memory: {conditions['peak_memory_method']}")
    return " · ".join(parts)


# --- one report: metrics as rows ---------------------------------------------------------


def _side_by_side(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = rows_of(report)
    names = [name for name, _ in rows]
    figures = dict(rows)
    with_ratio = "baseline" in figures and "model" in figures
    header = ["metric", *names] + (["× baseline"] if with_ratio else [])
    body = []
    for key in _keys_present(list(figures.values())):
        label = COLUMNS[key].label if key in COLUMNS else key
        cells = [format_value(key, figures[n].get(key)) for n in names]
        if with_ratio:
            cells.append(format_ratio(key, figures["model"].get(key),
                                      figures["baseline"].get(key)))
        body.append([label, *cells])
    return header, body


def render_table(report: Mapping[str, Any], *, title: str | None = None) -> Table:
    """A rich table of one report: metrics as rows, baseline | model | × baseline."""
    header, body = _side_by_side(report)
    table = Table(title=title, caption=conditions_line(report.get("conditions", {})))
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def to_markdown(report: Mapping[str, Any]) -> str:
    """The same table as :func:`render_table`, in Markdown, after a conditions line."""
    header, body = _side_by_side(report)
    line = conditions_line(report.get("conditions", {}))
    return f"Conditions: {line}\n\n{_markdown_table(header, body)}"


# --- several variants: variants as rows ---------------------------------------------------


def _variants(rows: Sequence[Row], reference: str | None) -> tuple[list[str], list[list[str]]]:
    figures = dict(rows)
    if reference is not None and reference not in figures:
        raise ValueError(f"reference {reference!r} is not one of the rows: {list(figures)}")
    keys = _keys_present([f for _, f in rows])
    with_note = any("error" in f for _, f in rows)
    header = ["model"] + [COLUMNS[k].label if k in COLUMNS else k for k in keys]
    header += ["note"] if with_note else []
    body = []
    for name, values in rows:
        cells = [name]
        for key in keys:
            cell = format_value(key, values.get(key))
            if reference is not None and name != reference:
                ratio = format_ratio(key, values.get(key), figures[reference].get(key))
                cell += f" ({ratio})" if ratio else ""
            cells.append(cell)
        if with_note:
            cells.append(str(values.get("error", "")))
        body.append(cells)
    return header, body


def render_rows(
    rows: Sequence[Row], *, reference: str | None = None, title: str | None = None,
    caption: str | None = None,
) -> Table:
    """A rich table with one row per variant and one column per metric.

    With ``reference`` (the name of one row, e.g. "baseline"), every other row's figures
    also show their multiple of the reference's, e.g. "4.1 ms (0.52×)".
    """
    header, body = _variants(rows, reference)
    table = Table(title=title, caption=caption)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 or name == "note" else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def rows_to_markdown(rows: Sequence[Row], *, reference: str | None = None) -> str:
    """The same table as :func:`render_rows`, in Markdown."""
    return _markdown_table(*_variants(rows, reference))


def _markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    align = ["---" if i == 0 or name == "note" else "---:" for i, name in enumerate(header)]
    return "\n".join([line(header), line(align), *(line(cells) for cells in body)]) + "\n"
