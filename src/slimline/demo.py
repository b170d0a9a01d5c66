"""``slimline demo``: the main job end to end on the built-in ``minilm``, offline.

Loads the real all-MiniLM-L6-v2 sentence encoder, compresses it with a recipe (default: W8A8
``int8_dynamic``), saves it, and measures it side by side with the original on held-out
standard-library docstring sentences: latency, throughput, peak memory (each model in a
process of its own), size, and cosine of the embeddings. Writes ``report.json``,
``report.md`` and ``chart.png`` under the output directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_RECIPE: dict[str, Any] = {"steps": [{"method": "int8_dynamic"}]}
DEMO_METRICS = ("latency", "throughput", "memory", "size", "flops", "cosine")


def run_demo(out: Path, *, n_batches: int = 4, recipe: dict[str, Any] | None = None) -> int:
    from rich.console import Console

    from slimline.api import compress, save
    from slimline.evaluate import evaluate, render_table, save_chart, to_markdown, write_json
    from slimline.models import load_builtin

    console = Console()
    with console.status("loading minilm (all-MiniLM-L6-v2) and its test sentences"):
        built = load_builtin("minilm")
        data = built.batches("test", batch_size=32, limit=n_batches)
    recipe = recipe or DEMO_RECIPE
    with console.status(f"compressing: {[s['method'] for s in recipe['steps']]}"):
        result = compress(built.model, recipe)
    for step in result.steps:
        console.print(f"  {step.method}: {len(step.modules)} modules in {step.seconds:.2f}s")
    save(result.model, out / "model", tokenizer=built.tokenizer, source="minilm")
    console.print(f"  saved to {out / 'model'}")
    with console.status("measuring baseline and compressed model, interleaved"):
        report = evaluate(result.model, data, metrics=list(DEMO_METRICS), baseline=built.model)
    console.print(render_table(report))
    write_json(report, out / "report.json")
    (out / "report.md").write_text(to_markdown(report))
    try:
        save_chart(report, out / "chart.png")
    except ImportError as exc:  # matplotlib is an optional extra
        console.print(f"  (no chart: {exc})")
    console.print(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return 0
