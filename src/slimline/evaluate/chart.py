"""A picture of the trade-off: quality against latency, one labelled point per model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slimline.evaluate.report import COLUMNS, Row, rows_of

# Quality keys a chart can use, preferred first when several are present in as many rows.
QUALITY_KEYS = ("perplexity", "accuracy", "cosine", "top1_agreement")
_LOWER_IS_BETTER = {"perplexity"}
# What the reference scores against itself, by definition (it has no such figures itself).
_SELF_SCORE = {"cosine": 1.0, "top1_agreement": 1.0}


def choose_quality(rows: Sequence[Row]) -> str:
    """The quality key present (with a latency) in the most rows; ties go to QUALITY_KEYS order."""
    counts = {key: sum(_point(f, key) is not None for _, f in rows) for key in QUALITY_KEYS}
    best = max(QUALITY_KEYS, key=lambda key: counts[key])  # max keeps the first of equals
    if counts[best] == 0:
        raise ValueError(
            "save_chart: no row has both latency_ms_median and one of " + ", ".join(QUALITY_KEYS)
        )
    return best


def _with_self_scores(rows: Sequence[Row], reference: str | None) -> list[Row]:
    return [
        (name, {**_SELF_SCORE, **figures} if name == reference else figures)
        for name, figures in rows
    ]


def _point(figures: Mapping[str, Any], quality: str) -> tuple[float, float] | None:
    x, y = figures.get("latency_ms_median"), figures.get(quality)
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        return float(x), float(y)
    return None


def save_chart(
    report_or_rows: Mapping[str, Any] | Sequence[Row],
    path: str | Path,
    *,
    quality: str | None = None,
    reference: str | None = None,
    title: str | None = None,
) -> Path:
    """Save a PNG of quality (``quality``, default :func:`choose_quality`) against median
    latency, one labelled point per model. Needs matplotlib (``pip install slimline[plot]``).

    ``reference`` names the row the others were compared with (default for a report:
    "baseline"); on a cosine or agreement chart it is drawn at 1.0, its score against itself.
    """
    if isinstance(report_or_rows, Mapping):
        rows = rows_of(report_or_rows)
        reference = reference or ("baseline" if "baseline" in report_or_rows["models"] else None)
    else:
        rows = list(report_or_rows)
    rows = _with_self_scores(rows, reference)
    key = quality or choose_quality(rows)
    points = [(name, p) for name, figures in rows if (p := _point(figures, key)) is not None]
    if not points:
        raise ValueError(f"save_chart: no row has both latency_ms_median and {key!r}")
    figure = _agg_figure()
    axes = figure.add_subplot()
    for name, (x, y) in points:
        axes.scatter([x], [y], s=36)
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    better = "lower" if key in _LOWER_IS_BETTER else "higher"
    axes.set_xlabel("latency, median per batch (ms) — lower is better")
    axes.set_ylabel(f"{COLUMNS[key].label} — {better} is better")
    axes.set_title(title or f"{COLUMNS[key].label} against latency")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


def _agg_figure() -> Any:
    """A matplotlib Figure drawn by the Agg backend, without touching pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("save_chart needs matplotlib: pip install slimline[plot]") from error
    figure = Figure(figsize=(6.4, 4.4), dpi=150)
    FigureCanvasAgg(figure)
    return figure
