"""A search result on paper: Markdown and rich tables, recipe files, JSON and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from slimline.search.objectives import METRICS, Metric

if TYPE_CHECKING:
    from slimline.search.energy_rating import EnergyRating
    from slimline.search.result import SearchResult, TrialRecord

_BYTES = {"size", "memory"}


def recipe_summary(recipe: Any) -> str:
    """``wanda(sparsity=0.5) → rtn(bits=4, group_size=128)``; the searched-for fields only
    differ from the defaults, so only non-default fields are shown."""
    from slimline.core.registry import config_type

    if not recipe or not recipe.get("steps"):
        return "(no steps: the original model)"
    parts = []
    for step in recipe["steps"]:
        defaults = config_type(step["method"])().to_dict()
        changed = [f"{k}={v}" for k, v in step.items()
                   if k not in ("method", "targets") and defaults.get(k) != v]
        parts.append(f"{step['method']}({', '.join(changed)})")
    return " → ".join(parts)


def format_value(m: Metric, value: float) -> str:
    if m.timing:
        return f"{value:.3g}×"
    if m.name in _BYTES:
        for size, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value:.0f} B"
    return f"{value:.4g}"


def _columns(result: SearchResult) -> list[Metric]:
    shown = list(result.objectives)
    shown += [c.metric for c in result.constraints if c.metric not in shown]
    return shown


def _cells(result: SearchResult, trial: TrialRecord) -> list[str]:
    figures, baseline = trial.figures()
    cells = []
    for m in _columns(result):
        try:
            cells.append(format_value(m, m.value(figures, baseline)))
        except ValueError:
            cells.append("–")
    return cells


def _header(result: SearchResult) -> list[str]:
    names = []
    for m in _columns(result):
        suffix = " (× baseline)" if m.timing else ""
        names.append(f"{m.name}{suffix} {'↑' if m.higher_is_better else '↓'}")
    return ["trial", "recipe", *names]


def front_table(result: SearchResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the front (the closest trials when none is feasible)."""
    rows = result.pareto if result.feasible else result.closest
    return _header(result), [[str(t.number), recipe_summary(t.recipe), *_cells(result, t)]
                             for t in rows]


def markdown(result: SearchResult) -> str:
    counts = result.counts()
    lines = [f"# Recipe search: study `{result.study}`", "",
             f"Objectives: {', '.join(m.name for m in result.objectives)}; constraints: "
             f"{', '.join(str(c) for c in result.constraints) or 'none'}. Trials: "
             + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".", "",
             "Timing figures are ratios to the original model timed in the same trial, "
             "interleaved.", ""]
    if result.feasible:
        lines.append("## Pareto front")
    else:
        lines += ["## No trial meets the constraints", "",
                  "The closest trials (least total relative violation):"]
    header, rows = front_table(result)
    lines += ["", _md_row(header), _md_row(["---"] * len(header)), *map(_md_row, rows)]
    if result.feasible:
        lines += ["", "## Recommended", ""]
        for m in result.objectives:
            best = result.best(objective=m.name)
            lines.append(f"- best {m.name}: {recipe_summary(best.to_dict())}")
    if result.energy is not None:
        lines += ["", *energy_markdown(result.energy)]
    failed = [t for t in result.trials if t.state in ("failed", "pruned") and t.note]
    if failed:
        lines += ["", "## Failed and pruned trials", ""]
        lines += [f"- trial {t.number} ({t.state}): {t.note}" for t in failed]
    return "\n".join(lines) + "\n"


_SOURCES = {"rapl": "read from the CPU's RAPL counters",
            "nvml": "read from the GPU's NVML counters",
            "estimate": "estimated by codecarbon from the CPU's TDP and load (no counters)"}


def stars_text(stars: int) -> str:
    return "★" * stars + "☆" * (5 - stars)


def energy_header() -> list[str]:
    return ["model", "recipe", "energy / 1,000 items", "× original", "CO2e / 1,000 items",
            "rating"]


def energy_cells(rating: EnergyRating) -> list[list[str]]:
    return [[row.label, recipe_summary(row.recipe), f"{row.kwh_per_1000 * 1e3:.3g} Wh",
             f"{rating.ratio(row):.3g}×", f"{row.co2_g_per_1000:.3g} g",
             f"{stars_text(row.stars)} ({row.stars})"] for row in rating.rows]


def energy_conditions(rating: EnergyRating) -> str:
    intensity = (f"{rating.carbon_intensity_g_per_kwh:.0f} g CO2e/kWh"
                 if rating.carbon_intensity_g_per_kwh is not None else "unknown")
    return (f"Energy {_SOURCES.get(rating.source, rating.source)} (source: {rating.source}; "
            f"hardware: {', '.join(rating.hardware) or 'none reported'}), codecarbon, the "
            f"models' inference loops interleaved in one run, at least {rating.seconds:.1f} s "
            f"and {rating.items} items each; CO2e at {intensity}.")


def energy_markdown(rating: EnergyRating) -> list[str]:
    header = energy_header()
    return ["## Energy rating", "", energy_conditions(rating), "", _md_row(header),
            _md_row(["---"] * len(header)), *(_md_row(r) for r in energy_cells(rating)), "",
            f"Rule: {rating.rule}"]


def energy_table(rating: EnergyRating) -> Any:
    from rich.table import Table

    table = Table(title="energy rating (relative to this front)", caption=rating.rule)
    for name in energy_header():
        table.add_column(name)
    for cells in energy_cells(rating):
        table.add_row(*cells)
    return table


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def rich_table(result: SearchResult) -> Any:
    from rich.table import Table

    title = "Pareto front" if result.feasible else "no trial meets the constraints: closest"
    table = Table(title=f"{title} (study {result.study})")
    header, rows = front_table(result)
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


def write_all(result: SearchResult, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    prefix = "pareto" if result.feasible else "closest"
    for trial in result.pareto if result.feasible else result.closest:
        path = out / f"{prefix}-trial{trial.number:03d}.yaml"
        trial.to_recipe().to_file(path)
        written.append(path)
    if result.feasible:
        best = out / "best.yaml"
        result.best().to_file(best)
        written.append(best)
    json_path = out / "search.json"
    json_path.write_text(result.to_json() + "\n")
    written.append(json_path)
    note = ""
    try:
        written.append(save_chart(result, out / "pareto.png"))
    except (ImportError, ValueError) as why:
        note = f"\n_No chart: {why}_\n"
    md = out / "pareto.md"
    md.write_text(markdown(result) + note)
    written.append(md)
    return written


def save_chart(result: SearchResult, path: Path) -> Path:
    """Quality against latency, one point per complete trial, marker area by size on disk;
    the front drawn in colour. ValueError when the search measured no latency or quality."""
    measured = [m.name for m in (*result.objectives, *(c.metric for c in result.constraints))]
    quality = next((METRICS[n] for n in measured if METRICS[n].quality), None)
    if quality is None or "latency" not in measured:
        raise ValueError("the chart needs latency and a quality metric among the objectives "
                         "or constraints")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the chart needs matplotlib: pip install slimline[plot]") from None
    figure = Figure(figsize=(6.4, 4.4), dpi=150)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    front = {t.number for t in result.pareto}
    for trial in result.trials:
        point = _point(trial, quality)
        if point is None:
            continue
        x, y, size = point
        on_front = trial.number in front
        axes.scatter([x], [y], s=size, alpha=0.8 if on_front else 0.3,
                     color="tab:blue" if on_front else "tab:gray")
        if on_front:
            axes.annotate(str(trial.number), (x, y), textcoords="offset points",
                          xytext=(4, 4), fontsize=7)
    axes.set_xlabel("latency × baseline (same trial, interleaved) — lower is better")
    better = "higher" if quality.higher_is_better else "lower"
    axes.set_ylabel(f"{quality.name} — {better} is better")
    axes.set_title(f"study {result.study}: marker area ∝ size on disk")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _point(trial: TrialRecord, quality: Metric) -> tuple[float, float, float] | None:
    if trial.state != "complete":
        return None
    figures, baseline = trial.figures()
    try:
        x = METRICS["latency"].value(figures, baseline)
        y = quality.value(figures, baseline)
    except ValueError:
        return None
    size, base = figures.get("size_bytes_disk"), baseline.get("size_bytes_disk")
    area = 200.0 * size / base if isinstance(size, (int, float)) and base else 40.0
    return x, y, max(area, 8.0)
