"""The files ``sl.save`` writes beside the tensors and ``recipe.json``, for other tools.

In order, so that the later one wins: the source directory's files, the tokenizer handed to
``save`` (a user's edited tokenizer replaces the source's), ``config.json`` written from the
model (never the source's), and the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from slimline.export import hf_config, model_card, source_files
from slimline.export.model_card import CARD_FILE


def write_companions(
    model: nn.Module,
    directory: Path,
    manifest: dict[str, Any],
    tokenizer: Any | None,
    source_dir: Path | None,
) -> None:
    """Write the source's files, the tokenizer, ``config.json`` and ``README.md``."""
    from slimline import __version__

    if source_dir is not None:
        source_files.copy_source_files(source_dir, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    config = getattr(model, "config", None)
    marked = config is not None and hasattr(config, "to_json_file") \
        and hf_config.write_config(config, directory, manifest)
    card = model_card.render(
        manifest, version=__version__, reports=manifest["reports"], marked=marked,
        source_card=_source_card(source_dir),
    )
    (directory / CARD_FILE).write_text(card, encoding="utf-8")


def _source_card(source_dir: Path | None) -> str | None:
    card = source_dir / CARD_FILE if source_dir is not None else None
    return card.read_text(encoding="utf-8") if card is not None and card.is_file() else None
