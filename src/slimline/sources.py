"""Where the command line's models and data come from: built-in names or local directories.

``M`` is a built-in model name (``code-llama-tiny``, ``minilm``, ``digits-cnn``; ``NAME@small``
for the quick test variant), a directory written by ``sl.save``, a directory written by
``sl.export`` (ONNX or OpenVINO IR, run by its runtime), or a local Hugging Face model
directory (``config.json`` + weights). Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from slimline.core.batches import Batch
from slimline.core.checkpoint import RECIPE_FILE, SOURCE_ATTR, SOURCE_DIR_ATTR

Split = Literal["train", "validation", "test"]


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: tokenizer and, for built-ins, its data."""

    model: nn.Module
    tokenizer: Any | None
    builtin: str | None  # the built-in model it is or came from
    directory: Path | None = None  # the local directory it was read from (its files are kept)

    def data(
        self,
        text_file: str | None,
        *,
        split: Split,
        batch_size: int,
        limit: int | None,
        flag: str = "--data",
    ) -> list[Batch]:
        """Batches from a text file (one sample a line) or from the built-in's own data;
        ``flag`` is the command-line option that names the file, for the error without one."""
        if text_file is not None:
            return text_batches(Path(text_file), self.tokenizer, batch_size, limit,
                                max_length=min(TEXT_TOKENS, _context(self.model)))
        if self.builtin is None:
            raise ValueError(f"this model has no built-in data: pass a text file ({flag})")
        from slimline.models import load_builtin

        name, size = _split_size(self.builtin)
        return load_builtin(name, size=size).batches(split, batch_size=batch_size, limit=limit)


def _split_size(name: str) -> tuple[str, Literal["full", "small"]]:
    base, _, size = name.partition("@")
    if size not in ("", "small", "full"):
        raise ValueError(f"model {name!r}: size must be @small or @full")
    return base, "small" if size == "small" else "full"


def resolve_model(spec: str) -> LoadedModel:
    """Load ``spec``: a built-in name, a slimline checkpoint or a Hugging Face directory."""
    from slimline.models import BUILTIN_MODELS, is_builtin, load_builtin

    name, size = _split_size(spec)
    if is_builtin(name):
        built = load_builtin(name, size=size)
        setattr(built.model, SOURCE_ATTR, spec)
        if built.directory is not None:  # sl.save carries its files over (minilm's ST files)
            setattr(built.model, SOURCE_DIR_ATTR, str(built.directory.resolve()))
        return LoadedModel(built.model, built.tokenizer, spec, built.directory)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"model {spec!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor an existing directory"
        )
    from slimline.export.runtime import ExportedModel, is_exported

    if is_exported(path):  # sl.export's directory: run by onnxruntime, OpenVINO or llama.cpp
        exported = ExportedModel(path)
        return LoadedModel(exported, _tokenizer(path), exported.source, path)
    if (path / RECIPE_FILE).is_file():
        from slimline.core.checkpoint import load

        model = load(path)
        setattr(model, SOURCE_DIR_ATTR, str(path.resolve()))  # sl.save carries its files over
        return LoadedModel(model, _tokenizer(path), getattr(model, SOURCE_ATTR, None), path)
    if (path / "config.json").is_file():
        model = _hf_model(path)
        setattr(model, SOURCE_DIR_ATTR, str(path.resolve()))
        return LoadedModel(model, _tokenizer(path), None, path)
    raise ValueError(f"{spec!r} has neither recipe.json (slimline) nor config.json (Hugging Face)")


def _hf_model(path: Path) -> nn.Module:
    import transformers

    config = json.loads((path / "config.json").read_text())
    names = config.get("architectures") or ["AutoModel"]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise ValueError(f"{path}: transformers has no class {names[0]!r}")
    model: nn.Module = cls.from_pretrained(str(path), local_files_only=True)
    return model.eval()


def _tokenizer(path: Path) -> Any | None:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


TEXT_TOKENS = 256  # a text line is cut to this many tokens (or the model's context, if shorter)


def _context(model: nn.Module) -> int:
    """The most positions ``model`` takes (its config's, or an export's recorded one), or
    :data:`TEXT_TOKENS` if it says none."""
    from slimline.export.graph import max_positions

    return max_positions(model) or TEXT_TOKENS


def text_batches(path: Path, tokenizer: Any, batch_size: int, limit: int | None,
                 *, max_length: int = TEXT_TOKENS) -> list[Batch]:
    """Tokenize the non-empty lines of ``path`` into padded batches, each line cut to
    ``max_length`` tokens."""
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    if tokenizer is None:
        raise ValueError("a text data file needs a model with a tokenizer")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"data file {str(path)!r} has no text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches: list[Batch] = []
    for start in range(0, len(lines), batch_size):
        enc = tokenizer(
            lines[start : start + batch_size], padding=True, truncation=True,
            max_length=max_length, return_tensors="pt",
        )
        batches.append(dict(enc))
        if limit is not None and len(batches) >= limit:
            break
    return batches
