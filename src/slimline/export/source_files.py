"""Carry over what a source Hugging Face directory had besides its weights.

A model read from a local directory comes with files the tensors do not hold: the tokenizer
(and its chat template), ``generation_config.json``, and for a sentence-transformers model the
modules after the transformer (pooling, normalisation, dense heads) that turn hidden states
into the embedding. Without them ``SentenceTransformer(out)`` falls back to its default mean
pooling without normalisation, and ``pipeline`` has no tokenizer. The source's own weights
and ``config.json`` are never copied: ``sl.save`` writes those from the model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Files read by transformers' tokenizers, generation and sentence-transformers, by name.
_FILES = (
    "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)  # fmt: skip
_TRANSFORMER_MODULE = "sentence_transformers.models.Transformer"  # the model itself


def copy_source_files(source: Path, target: Path) -> list[str]:
    """Copy ``source``'s non-weight files into ``target``; returns the names copied."""
    copied = [name for name in _FILES if (source / name).is_file()]
    for name in copied:
        shutil.copy2(source / name, target / name)
    for folder in _module_folders(source):
        shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)
        copied.append(folder + "/")
    return copied


def _module_folders(source: Path) -> list[str]:
    """The folders of the sentence-transformers modules after the transformer.

    The Transformer module's own folder (the root, or ``0_Transformer`` in old layouts) holds
    the source weights and is skipped; so is a folder that is not there (``Normalize`` needs no
    files); a path outside ``source`` is refused.
    """
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return []
    try:
        entries = json.loads(modules_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"save: source_dir {modules_file} is not valid JSON: {exc}") from None
    if not isinstance(entries, list):
        raise ValueError(f"save: source_dir {modules_file} must hold a list of modules")
    folders = []
    for entry in entries:
        path = entry.get("path", "") if isinstance(entry, dict) else ""
        if not path or entry.get("type") == _TRANSFORMER_MODULE:
            continue
        folder = (source / path).resolve()
        if not folder.is_relative_to(source.resolve()):
            raise ValueError(f"save: source_dir {modules_file}: module path {path!r} is not "
                             f"inside {source}")
        if folder.is_dir():
            folders.append(path)
    return folders
