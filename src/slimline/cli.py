"""The ``slimline`` command: thin commands over the Python API.

Every command ends with a readable table and writes a JSON report. Failures print one line on
stderr, never a traceback (``--debug``, before or after the command, shows it instead):

* a user error — bad recipe or arguments, a missing or unreadable file, a broken checkpoint,
  a missing optional extra — names the problem and exits with code 2;
* Ctrl-C exits with code 130 (128 + SIGINT, as shells report it);
* anything else is a bug in slimline: the line says so, names the exception, and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from slimline.core.checkpoint import RECIPE_FILE
from slimline.sources import LoadedModel, resolve_model

if TYPE_CHECKING:
    from slimline.core.recipe import Recipe

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# What a user can cause and fix: bad values, files that are missing, unreadable or not files
# (OSError covers PermissionError and IsADirectoryError), optional extras not installed.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # the command, as typed
    except SystemExit as stop:  # --help, or a usage error already printed on one line
        return EXIT_USAGE if stop.code is not None and not isinstance(stop.code, int) \
            else stop.code or 0
    try:
        result: int = args.run(args)
        return result
    except BaseException as exc:
        if args.debug or isinstance(exc, SystemExit):
            raise
        return _report(exc)


def _report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr; the exit code for its kind."""
    if isinstance(exc, KeyboardInterrupt):
        _say("interrupted")
        return EXIT_INTERRUPTED
    if isinstance(exc, USER_ERRORS):
        _say(f"error: {_one_line(exc)}")
        return EXIT_USAGE
    _say(f"internal error, a bug in slimline: {type(exc).__name__}: {_one_line(exc)} "
         "(run again with --debug for the traceback, and please report it)")
    return EXIT_BUG


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _say(message: str) -> None:
    print(f"slimline: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (the usage itself is under ``--help``)."""

    def error(self, message: str) -> NoReturn:
        _say(f"error: {self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimline", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    # The same flag after the command; SUPPRESS keeps it from resetting one given before.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", parents=[debug],
                          help="compress the built-in minilm and compare, offline")
    demo.add_argument("--out", default="slimline-demo", help="directory for model and report")
    demo.add_argument("--batches", type=int, default=4, help="test batches of 32 sentences")
    demo.set_defaults(run=_demo)

    comp = sub.add_parser("compress", parents=[debug],
                          help="apply a recipe to a model and save it")
    comp.add_argument("--model", required=True, help="built-in name or model directory")
    comp.add_argument("--recipe", required=True, help="recipe file (.yaml/.yml/.json)")
    comp.add_argument("--out", required=True, help="output directory")
    comp.add_argument("--calibration", help="text file (one sample a line); default: built-in data")
    comp.add_argument("--calibration-batches", type=int, default=8)
    comp.add_argument("--train-data", help="text file (one sample a line) for training steps "
                      "(distill, lora, qat); default: the built-in's train split")
    comp.add_argument("--train-batches", type=int, default=32)
    comp.add_argument("--batch-size", type=int, default=8)
    comp.add_argument("--report", help="JSON report path (default: OUT/compress.json)")
    comp.set_defaults(run=_compress)

    ev = sub.add_parser("eval", parents=[debug],
                        help="measure a model, side by side with a baseline")
    ev.add_argument("--model", required=True,
                    help="built-in name, model directory, or a directory sl.export wrote")
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

    ex = sub.add_parser("export", parents=[debug],
                        help="export a model (ONNX, OpenVINO IR, GGUF), checked for parity "
                        "with torch")
    ex.add_argument("--model", required=True, help="built-in name or model directory")
    ex.add_argument("--format", required=True, choices=["onnx", "openvino", "gguf"])
    ex.add_argument("--dtype", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"], default="f16",
                    help="gguf: tensor type (q8_0/q4_0/q4_1: llama.cpp's blocks of 32)")
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--data", help="text file (one sample a line) for the example batch; "
                    "default: built-in test data")
    ex.add_argument("--batch-size", type=int, default=2)
    ex.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                    help="dynamo: through torch.export; auto: the first within parity")
    ex.add_argument("--external-data", action="store_true",
                    help="onnx: weights in model.onnx.data (default: only past 2 GiB)")
    ex.add_argument("--min-cosine", type=float, default=None,
                    help="parity: least cosine to the torch model (default 0.9999; a W8A8 "
                    "model needs a looser one, see slimline.export.parity)")
    ex.add_argument("--atol", type=float, default=None,
                    help="parity: max abs difference as a fraction of the output's scale "
                    "(default 1e-4)")
    ex.set_defaults(run=_export)

    se = sub.add_parser("search", parents=[debug],
                        help="search recipes: the Pareto front under constraints (optuna)")
    se.add_argument("--model", required=True, help="built-in name or model directory")
    se.add_argument("--objectives", default="latency,size", help="comma-separated metrics")
    se.add_argument("--constraint", action="append", default=[],
                    help='e.g. "cosine>=0.99" or "perplexity<=+2%%" (repeatable)')
    se.add_argument("--trials", type=int, default=20)
    se.add_argument("--storage", help="optuna database URL, e.g. sqlite:///search.db")
    se.add_argument("--study", help="study name (the same storage and name resume it)")
    se.add_argument("--space", help="YAML file narrowing the methods and ranges searched")
    se.add_argument("--out", required=True, help="directory for the recipes and the report")
    se.add_argument("--data", help="text file (one sample a line); default: built-in "
                    "validation data")
    se.add_argument("--batches", type=int, default=4)
    se.add_argument("--batch-size", type=int, default=32)
    se.add_argument("--calibration-batches", type=int, default=8,
                    help="built-in train batches for calibration (0: leave out the methods "
                    "that need it)")
    se.add_argument("--train-batches", type=int, default=0,
                    help="built-in train batches for training steps (0: leave them out)")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--runs", type=int, default=5)
    se.add_argument("--worker", type=int, default=0,
                    help="this worker's number among those sharing --study (each its own)")
    se.add_argument("--no-warm-start", action="store_true",
                    help="do not start with each method alone at its defaults")
    se.add_argument("--energy-rating", action="store_true",
                    help="measure energy per 1,000 items of the front and rate it 1-5 stars")
    se.set_defaults(run=_search)

    ls = sub.add_parser("list", parents=[debug], help="the methods table")
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
    from slimline.train.launch import process_group

    recipe = _read_recipe(args.recipe)  # validated before any model is loaded
    source = resolve_model(args.model)
    calibration = None
    if recipe.needs_calibration:
        calibration = source.data(
            args.calibration, split="train", batch_size=args.batch_size,
            limit=args.calibration_batches, flag="--calibration",
        )  # fmt: skip
    training = None
    if any(step.needs_training for step in recipe.steps):
        # --train-data, else the built-in's train split, else the calibration text.
        text = args.train_data
        if text is None and source.builtin is None:
            text = args.calibration
        training = source.data(
            text, split="train", batch_size=args.batch_size, limit=args.train_batches,
            flag="--train-data",
        )  # fmt: skip
    with process_group() as rank:  # under torchrun: train together, rank 0 saves and prints
        if rank != 0:
            compress(source.model, recipe, calibration=calibration, training=training)
            return 0
        console = _console()
        with console.status(f"compressing {args.model} ({len(recipe)} steps)"):
            result = compress(source.model, recipe, calibration=calibration, training=training,
                              progress=True)
    # A directory's tokenizer files are copied as they are (save's source_dir), not re-saved.
    tokenizer = None if source.directory is not None else source.tokenizer
    out = save(result.model, args.out, tokenizer=tokenizer, source=source.builtin,
               source_dir=source.directory)
    report = {"model": args.model, "out": str(out), "steps": [s.to_dict() for s in result.steps]}
    _write_json(report, Path(args.report) if args.report else out / "compress.json")
    _print_steps(console, result.steps)
    console.print(f"saved to [bold]{out}[/bold]")
    return 0


def _read_recipe(path: str) -> Recipe:
    """``Recipe.from_file``, with a syntax error reported as a ValueError naming the file."""
    import yaml

    from slimline.core.recipe import Recipe

    if Path(path).is_dir():
        raise ValueError(f"recipe file {path!r} is a directory")
    try:
        return Recipe.from_file(path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"recipe file {path!r} is not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ValueError(f"recipe file {path!r} is not valid YAML: {problem}{where}") from None


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
    if source.directory is not None and (source.directory / RECIPE_FILE).is_file():
        from slimline.export.model_card import write_evaluation

        command = "slimline " + " ".join(shlex.quote(a) for a in args.argv)
        card = write_evaluation(source.directory, to_markdown(report), command)
        print(f"figures added to the model card {card}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from slimline.api import export
    from slimline.export.report import REPORT_FILE

    source = resolve_model(args.model)
    example = source.data(args.data, split="test", batch_size=args.batch_size, limit=1)[0]
    tokenizer = None if source.directory is not None else source.tokenizer  # files copied
    options: dict[str, Any] = {"external_data": args.external_data or None} \
        if args.format == "onnx" else {}
    options.update({k: v for k, v in (("min_cosine", args.min_cosine), ("atol", args.atol))
                    if v is not None})
    options |= {"dtype": args.dtype} if args.format == "gguf" else {"exporter": args.exporter}
    with _console().status(f"exporting {args.model} to {args.format}"):
        report = export(source.model, args.out, format=args.format, example=example,
                        tokenizer=tokenizer, **options)
    print(report.summary())
    print(f"exported to {report.path} ({report.exporter} exporter); report in "
          f"{report.path / REPORT_FILE}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from slimline.search import search
    from slimline.search.objectives import parse_constraints, parse_objectives
    from slimline.search.render import rich_table

    parse_objectives(args.objectives)  # bad names fail before the model is loaded
    parse_constraints(args.constraint)
    source = resolve_model(args.model)
    data = source.data(args.data, split="validation", batch_size=args.batch_size,
                       limit=args.batches)
    calibration = _train_split(source, args.calibration_batches, args.batch_size)
    training = _train_split(source, args.train_batches, args.batch_size)
    found = search(source.model, data, calibration=calibration, training=training,
                   objectives=args.objectives, constraints=args.constraint, trials=args.trials,
                   storage=args.storage, study=args.study, space=args.space, seed=args.seed,
                   runs=args.runs, worker=args.worker, energy_rating=args.energy_rating,
                   warm_start=not args.no_warm_start,
                   progress=True)
    written = found.write(args.out)
    _console().print(rich_table(found))
    if found.energy is not None:
        from slimline.search.render import energy_table

        _console().print(energy_table(found.energy))
    print(f"{len(written)} files written to {args.out} (search.json, pareto.md, recipes)")
    return 0


def _train_split(source: LoadedModel, batches: int, batch_size: int) -> list[Any] | None:
    """The built-in's train batches, or None (no built-in data, or 0 asked)."""
    if batches <= 0 or source.builtin is None:
        return None
    return source.data(None, split="train", batch_size=batch_size, limit=batches)


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
