"""A Hugging Face byte-level BPE tokenizer as llama.cpp's GGUF metadata (``tokenizer.ggml.*``).

llama.cpp's own converter recognises a BPE pre-tokenizer by hashing what it makes of a fixed
text and refuses one it has not seen ("BPE pre-tokenizer was not recognized"), which a locally
trained tokenizer never is. slimline reads the pre-tokenizer from ``tokenizer.json`` instead: a
``ByteLevel`` pre-tokenizer with its regex on is GPT-2's split, which llama.cpp knows as
``tokenizer.ggml.pre = "gpt-2"``. Anything else is refused by name rather than guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# llama.cpp's token types (gguf.TokenType): kept here as ints so this module imports no gguf.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclass(frozen=True)
class Vocab:
    """What llama.cpp reads of a tokenizer: tokens by id, their types, merges, special ids."""

    tokens: list[str]
    types: list[int]
    merges: list[str]  # "left right", in priority order
    bos: int | None
    eos: int | None
    pad: int | None
    add_bos: bool


def tokenizer_json(tokenizer: Any | None, source_dir: str | None) -> dict[str, Any]:
    """The ``tokenizer.json`` of ``tokenizer`` (a transformers fast tokenizer), else of the
    model's source directory; ValueError when there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parsed: dict[str, Any] = json.loads(backend.to_str())
        return parsed
    if tokenizer is not None:
        raise ValueError(f"export: gguf needs a fast tokenizer (tokenizer.json), got "
                         f"{type(tokenizer).__name__}")
    for name in ("tokenizer.json", "tokenizer/tokenizer.json"):
        file = Path(source_dir) / name if source_dir is not None else None
        if file is not None and file.is_file():
            loaded: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
            return loaded
    raise ValueError("export: gguf needs the model's tokenizer (llama.cpp cannot load a file "
                     "without one): pass tokenizer=... or export a model directory holding "
                     "tokenizer.json")


def build_vocab(spec: dict[str, Any], vocab_size: int, tokenizer: Any | None) -> Vocab:
    """llama.cpp's view of the tokenizer ``spec`` (tokenizer.json) for a model of
    ``vocab_size`` embedding rows: ids past the tokenizer's own are ``[PAD<id>]`` tokens of
    type UNUSED (llama.cpp requires one token per row)."""
    check_bpe(spec)
    by_id: dict[int, str] = {int(i): t for t, i in spec["model"]["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"export: the tokenizer has token id {max(by_id)} but the model has "
                         f"{vocab_size} embedding rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    bos, eos, pad = (_special_id(tokenizer, spec, k) for k in ("bos", "eos", "pad"))
    return Vocab(tokens, kinds, merges, bos, eos, pad, _adds_bos(tokenizer, bos))


def check_bpe(spec: dict[str, Any]) -> None:
    """ValueError naming the part of ``spec`` llama.cpp's ``gpt2`` BPE would not reproduce."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"export: gguf writes byte-level BPE tokenizers only; this one's model "
                         f"is {model.get('type')!r}")
    if spec.get("normalizer") is not None:
        raise ValueError(f"export: gguf cannot write the tokenizer's normalizer "
                         f"{spec['normalizer'].get('type')!r} (llama.cpp's gpt2 BPE has none)")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise ValueError(f"export: gguf writes the GPT-2 byte-level pre-tokenizer only "
                         f"(ByteLevel, use_regex, no prefix space); this one is {pre!r}")


def _special_id(tokenizer: Any | None, spec: dict[str, Any], kind: str) -> int | None:
    value = getattr(tokenizer, f"{kind}_token_id", None) if tokenizer is not None else None
    if isinstance(value, int):
        return value
    names = {"bos": ("<s>", "<|endoftext|>"), "eos": ("</s>", "<|endoftext|>"),
             "pad": ("<pad>", "<|pad|>")}[kind]
    found = [a["id"] for a in spec.get("added_tokens", []) if a["content"] in names]
    return int(found[0]) if found else None


def _adds_bos(tokenizer: Any | None, bos: int | None) -> bool:
    """Whether the tokenizer puts BOS first when it encodes (llama.cpp must do the same)."""
    if tokenizer is None or bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
