"""``README.md`` of a saved checkpoint: what was done to the model and how to load it.

The slimline section sits between two HTML comments so that saving a model read from a
slimline checkpoint replaces the old section instead of stacking another. A source model's
card is kept below it, and its YAML front matter (license, tags, pipeline — what the Hugging
Face Hub reads) stays at the top of the file, where the Hub looks for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"

BEGIN = "<!-- slimline:begin -->"
END = "<!-- slimline:end -->"
EVAL_BEGIN = "<!-- slimline:eval:begin -->"
EVAL_END = "<!-- slimline:eval:end -->"


def render(
    manifest: dict[str, Any],
    *,
    version: str,
    reports: list[dict[str, Any]],
    marked: bool,
    source_card: str | None,
) -> str:
    """The card's text for the checkpoint ``manifest`` describes."""
    front, body = split_front_matter(source_card or "")
    body = _without_slimline_section(body).strip()
    section = "\n\n".join([
        f"{BEGIN}\n# {manifest['architecture']['class']}, compressed with slimline {version}",
        _recipe_part(manifest["recipe"]),
        _steps_part(reports),
        _load_part(manifest["architecture"], marked),
    ]) + f"\n{END}\n"
    source_part = f"\n## The source model's card\n\n{body}\n" if body else ""
    return front + section + source_part


def with_evaluation(card: str, table: str, command: str) -> str:
    """``card`` with the figures of ``slimline eval`` (a Markdown ``table``) in its slimline
    section, replacing those of an earlier run."""
    part = (f"{EVAL_BEGIN}\n## Measured by `slimline eval`\n\n{table.strip()}\n\n"
            f"Command: `{command}`\n{EVAL_END}")
    start, stop = card.find(EVAL_BEGIN), card.find(EVAL_END)
    if 0 <= start < stop:
        return card[:start] + part + card[stop + len(EVAL_END):]
    end = card.find(END)
    if end >= 0:
        return card[:end] + part + "\n" + card[end:]
    return card.rstrip() + "\n\n" + part + "\n"


def write_evaluation(directory: Path, table: str, command: str) -> Path:
    """Put ``slimline eval``'s figures into the card of the checkpoint in ``directory``
    (written atomically); returns the card's path."""
    card = directory / CARD_FILE
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    tmp = card.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(with_evaluation(text, table, command), encoding="utf-8")
    tmp.replace(card)
    return card


def split_front_matter(text: str) -> tuple[str, str]:
    """``(front matter with its --- lines, rest)``; empty front matter when there is none."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end >= 0:
            return text[: end + 5] + "\n", text[end + 5 :]
    return "", text


def _without_slimline_section(text: str) -> str:
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        return text
    rest = text[stop + len(END) :].lstrip()
    return rest.removeprefix("## The source model's card").lstrip()


def _recipe_part(recipe: dict[str, Any]) -> str:
    if not recipe["steps"]:
        return "## Recipe\n\nNo compression step: the weights are the source model's."
    steps = json.dumps(recipe, indent=2)
    return f"## Recipe\n\nThe steps applied, in order (`slimline compress --recipe`):\n\n" \
           f"```json\n{steps}\n```"


def _steps_part(reports: list[dict[str, Any]]) -> str:
    if not reports:
        return "## What each step did\n\nNot recorded (the model was saved without a report)."
    rows = ["| # | method | layers changed | seconds | notes |", "| --- | --- | --- | --- | --- |"]
    for i, report in enumerate(reports, 1):
        notes = "; ".join(str(n) for n in report.get("notes", [])).replace("|", "\\|") or "–"
        rows.append(f"| {i} | `{report.get('method')}` | {report.get('modules', '–')} | "
                    f"{float(report.get('seconds', 0.0)):.2f} | {notes} |")
    return "## What each step did\n\n" + "\n".join(rows)


def _load_part(architecture: dict[str, Any], marked: bool) -> str:
    if architecture["kind"] == "user":
        call = f'sl.load("path/to/this/dir", model={architecture["class"].rpartition(".")[2]}(...))'
    else:
        call = 'sl.load("path/to/this/dir")'
    text = ("## How to load\n\n```python\nimport slimline as sl\n\n"
            f"model = {call}\n```\n\n"
            "Only safetensors and JSON are read; no pickle.")
    if marked:
        text += ("\n\nWith slimline installed, transformers reads it too once `import slimline` "
                 "has run: `AutoModel*.from_pretrained(dir)`, `SentenceTransformer(dir)` and "
                 "`pipeline(..., model=dir)` give the compressed model, and its "
                 "`save_pretrained(out)` writes a directory like this one. Without slimline, "
                 "transformers refuses this directory with an error naming slimline: its "
                 "compressed layers need slimline's modules.")
    return text
