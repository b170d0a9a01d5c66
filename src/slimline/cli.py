"""The ``slimline`` command: thin commands over the Python API.

Every command ends with a readable table and writes a JSON report. A user error (bad recipe,
missing path, unknown method...) prints one line naming the problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slimline.sources import LoadedModel, resolve_model

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        return result
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"slimline: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compress the built-in minilm and compare, offline")
    demo.add_argument("--out", default="slimline-demo", help="directory for model and report")
    demo.add_argument("--batches", type=int, default=4, help="test batches of 32 sentences")
    demo.set_defaults(run=_demo)

    comp = sub.add_parser("compress", help="apply a recipe to a model and save it")
    comp.add_argument("--model", required=True, help="built-in name or model directory")
    comp.add_argument("--recipe", required=True, help="recipe file (.yaml/.yml/.json)")
    comp.add_argument("--out", required=True, help="output directory")
    comp.add_argument("--calibration", help="text file (one sample a line); default: built-in data")
    comp.add_argument("--calibration-batches", type=int, default=8)
    comp.add_argument("--batch-size", type=int, default=8)
    comp.add_argument("--report", help="JSON report path (default: OUT/compress.json)")
    comp.set_defaults(run=_compress)

    ev = sub.add_parser("eval", help="measure a model, side by side with a baseline")
    ev.add_argument("--model", required=True, help="built-in name or model directory")
    ev.add_argument("--baseline", help="built-in name or model directory to compare against")
    ev.add_argument("--data", help="text file (one sample a line); default: built-in test data")
    ev.add_argument("--metrics", help="comma-separated metric names (default: all that apply)")
    ev.add_argument("--batches", type=int, default=4)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--runs", type=int, default=10)
    ev.add_argument("--report", default="slimline-eval.json", help="JSON report path")
    ev.add_argument("--markdown", help="also write the table as Markdown here")
    ev.add_argument("--chart", help="also write a quality-vs-latency PNG here")
    ev.set_defaults(run=_eval)

    ls = sub.add_parser("list", help="the methods table")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(run=_list)
    return parser


def _console() -> Any:
    from rich.console import Console

    return Console()


def _list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from slimline.api import list_methods

    rows = list_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="slimline methods")
    for column in ("method", "family", "calibration", "training", "devices", "fields", "paper"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["method"], r["family"], _yes(r["calibration"]), _yes(r["training"]),
            ",".join(r["devices"]), ", ".join(r["fields"]), r["paper"],
        )
    _console().print(table)
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _compress(args: argparse.Namespace) -> int:
    from slimline.api import compress, save
    from slimline.core.recipe import Recipe

    recipe = Recipe.from_file(args.recipe)  # validated before any model is loaded
    source = resolve_model(args.model)
    calibration = None
    if recipe.needs_calibration:
        calibration = source.data(
            args.calibration, split="train", batch_size=args.batch_size,
            limit=args.calibration_batches,
        )
    console = _console()
    with console.status(f"compressing {args.model} ({len(recipe)} steps)"):
        result = compress(source.model, recipe, calibration=calibration, progress=True)
    out = save(result.model, args.out, tokenizer=source.tokenizer, source=source.builtin)
    report = {"model": args.model, "out": str(out), "steps": [s.to_dict() for s in result.steps]}
    _write_json(report, Path(args.report) if args.report else out / "compress.json")
    _print_steps(console, result.steps)
    console.print(f"saved to [bold]{out}[/bold]")
    return 0


def _print_steps(console: Any, steps: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="steps applied")
    for column in ("method", "modules", "seconds", "notes"):
        table.add_column(column)
    for s in steps:
        table.add_row(s.method, str(len(s.modules)), f"{s.seconds:.2f}", "; ".join(s.notes))
    console.print(table)


def _eval(args: argparse.Namespace) -> int:
    from slimline.evaluate import evaluate, render_table, save_chart, to_markdown, write_json

    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    source = resolve_model(args.model)
    baseline_name = args.baseline or source.builtin
    baseline: LoadedModel | None = resolve_model(baseline_name) if baseline_name else None
    data = source.data(args.data, split="test", batch_size=args.batch_size, limit=args.batches)
    report = evaluate(
        source.model, data, metrics=metrics, baseline=baseline.model if baseline else None,
        threads=args.threads, runs=args.runs, progress=True,
    )
    write_json(report, args.report)
    if args.markdown:
        Path(args.markdown).write_text(to_markdown(report))
    if args.chart:
        save_chart(report, args.chart)
    _console().print(render_table(report))
    print(f"report written to {args.report}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from slimline.demo import run_demo

    return run_demo(Path(args.out), n_batches=args.batches)


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
