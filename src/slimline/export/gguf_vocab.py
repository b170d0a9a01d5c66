"""A Hugging Face BPE tokenizer as llama.cpp's GGUF metadata (``tokenizer.ggml.*``): byte-level
(GPT-2's family, ``gpt2``) or SentencePiece-style with byte fallback (Llama 2's, ``llama``).

llama.cpp's own converter recognises a BPE pre-tokenizer by hashing what it makes of a fixed
text and refuses one it has not seen ("BPE pre-tokenizer was not recognized"), which a locally
trained tokenizer never is. slimline reads the pre-tokenizer from ``tokenizer.json`` instead and
names the split llama.cpp runs for it (``tokenizer.ggml.pre``):

- ``ByteLevel`` with its regex on: GPT-2's split, ``gpt-2``;
- ``Digits`` (each digit alone), then GPT-2's ``ByteLevel``: SmolLM's, ``smollm``;
- a ``Split`` on Llama 3's regex (tiktoken's cl100k: digits in runs of up to three) or on
  Qwen2's (each digit alone), then ``ByteLevel`` without its regex: ``llama-bpe``, ``qwen2``.

Anything else is refused by name rather than guessed. An NFC normalizer (Qwen2's) is accepted
as llama.cpp's converter accepts it: llama.cpp does not normalize, so text that is not already
in NFC may split differently there; ``export.json`` says so.

A SentencePiece-style tokenizer (Llama 2, TinyLlama, Mistral, Phi-3: ``▁`` for spaces, one
prepended, ``<0xXX>`` byte tokens for what the vocabulary lacks) is written as llama.cpp's
``llama`` tokenizer, which has no merge list: it merges the adjacent pair whose result scores
highest. ``tokenizer.json`` holds merges in priority order and no scores, so each token's score
is minus the rank of the first merge that makes it, and llama.cpp merges in the order Hugging
Face's BPE does. (llama.cpp's own converter gives every token -1000 when only
``tokenizer.json`` is there.) A tokenizer converted from SentencePiece lists every split of
every token as a merge, so the two agree on every text; one trained with merges that make a
token one way only may still be merged another way by llama.cpp. With a ``Metaspace``
pre-tokenizer, Hugging Face prepends a space only at the start of a text that does not begin
with one; llama.cpp prepends one to every text and after every special token (as for files its
own converter writes), so chat-templated prompts split differently (``export.json`` says so).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# llama.cpp's token types (gguf.TokenType): kept here as ints so this module imports no gguf.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's space, "▁"


@dataclass(frozen=True)
class Vocab:
    """What llama.cpp reads of a tokenizer: tokens by id, their types, merges, special ids."""

    model: str  # llama.cpp's tokenizer model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    merges: list[str]  # "left right", in priority order ("gpt2"; "llama" merges by score)
    scores: list[float] | None  # "llama": the score of each token
    pre: str | None  # llama.cpp's pre-tokenizer name (tokenizer.ggml.pre; "gpt2" only)
    caveat: str | None  # where llama.cpp may split text differently (export.json says it)
    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    add_bos: bool
    chat_template: str | None  # the tokenizer's Jinja chat template (llama.cpp, ollama read it)
    space_prefix: bool  # "llama": a space is prepended to the text (Llama 2's; not Gemma's)


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
    spm = sentencepiece_style(spec)
    pre = None if spm is not None else pre_tokenizer(spec)
    by_id: dict[int, str] = {int(i): t for t, i in spec["model"]["vocab"].items()}
    types = {i: NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    unk = spec["model"]["vocab"].get(spec["model"].get("unk_token"))
    if spm is not None:  # byte tokens and the unknown token by role, listed as added or not
        types |= {i: BYTE for i, t in by_id.items() if _is_byte_token(t)}
        if unk is not None:
            types[int(unk)] = UNKNOWN
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"export: the tokenizer has token id {max(by_id)} but the model has "
                         f"{vocab_size} embedding rows")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    bos, eos, pad = (_special_id(tokenizer, spec, k) for k in ("bos", "eos", "pad"))
    if spm is not None:
        ranks = merge_scores(merges)
        caveat = "llama.cpp prepends a space to every text and after each special token; the " \
            "tokenizer's Metaspace only at the start of text that does not begin with one" \
            if spm == "metaspace" else None
        return Vocab("llama", tokens, kinds, [], [ranks.get(t, 0.0) for t in tokens], None,
                     caveat, bos, eos, pad, None if unk is None else int(unk),
                     _adds_bos(tokenizer, spec, bos), _chat_template(tokenizer),
                     spm != "plain")
    caveat = "llama.cpp does not run the tokenizer's NFC normalizer: text not in NFC may " \
        "split differently" if spec.get("normalizer") is not None else None
    return Vocab("gpt2", tokens, kinds, merges, None, pre, caveat, bos, eos, pad, None,
                 _adds_bos(tokenizer, spec, bos), _chat_template(tokenizer), False)


def merge_scores(merges: list[str]) -> dict[str, float]:
    """Each token a merge makes -> minus the rank of the first merge that makes it: llama.cpp's
    SentencePiece merging (highest score first) then follows the merge list's priority."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def sentencepiece_style(spec: dict[str, Any]) -> str | None:
    """How ``spec`` makes a SentencePiece BPE, as transformers writes one (byte fallback, spaces
    made ``▁``): ``legacy`` (Llama 2's normalizer: one space prepended), ``metaspace`` (a
    Metaspace pre-tokenizer that prepends and does not split), ``plain`` (Gemma's: spaces
    replaced, none prepended); None for a tokenizer without byte fallback."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    normalizer, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    if normalizer == {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE}, replace]} and pre is None:
        return "legacy"
    if normalizer is None and isinstance(pre, dict) and pre.get("type") == "Metaspace" \
            and pre.get("replacement") == SPACE \
            and pre.get("prepend_scheme") in ("first", "always") and not pre.get("split", True):
        return "metaspace"
    # Gemma's Split on " " runs after every space became "▁": it never splits.
    if normalizer == replace and (pre is None or (
            pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})):
        return "plain"
    raise ValueError(f"export: gguf writes SentencePiece-style tokenizers that make spaces "
                     f"'{SPACE}' (Llama 2's, Metaspace, Gemma's); this one has normalizer "
                     f"{normalizer!r} and pre-tokenizer {pre!r}")


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


# The regexes of the Split pre-tokenizers llama.cpp knows, as tokenizer.json writes them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def pre_tokenizer(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the split of ``spec`` (tokenizer.json); ValueError naming what
    llama.cpp's BPE would not reproduce."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"export: gguf writes byte-level BPE tokenizers only; this one's model "
                         f"is {model.get('type')!r}")
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ValueError(f"export: gguf cannot write the tokenizer's normalizer "
                         f"{normalizer.get('type')!r} (llama.cpp's BPE has none)")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and _byte_level(steps[0], regex=True):
        return "gpt-2"
    if len(steps) == 2 and _byte_level(steps[1], regex=True) \
            and steps[0] == {"type": "Digits", "individual_digits": True}:
        return "smollm"
    if len(steps) == 2 and _byte_level(steps[1], regex=False) \
            and steps[0].get("type") == "Split" and not steps[0].get("invert") \
            and steps[0].get("behavior") == "Isolated" \
            and steps[0].get("pattern", {}).get("Regex") in _SPLITS:
        return _SPLITS[steps[0]["pattern"]["Regex"]]
    raise ValueError(f"export: gguf writes the byte-level pre-tokenizers llama.cpp knows "
                     f"(GPT-2's, SmolLM's digits, Llama 3's and Qwen2's regex splits); this "
                     f"one is {pre!r}")


def _byte_level(step: dict[str, Any], *, regex: bool) -> bool:
    return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex \
        and not step.get("add_prefix_space")


def _special_id(tokenizer: Any | None, spec: dict[str, Any], kind: str) -> int | None:
    value = getattr(tokenizer, f"{kind}_token_id", None) if tokenizer is not None else None
    if isinstance(value, int):
        return value
    names = {"bos": ("<s>", "<|endoftext|>"), "eos": ("</s>", "<|endoftext|>"),
             "pad": ("<pad>", "<|pad|>")}[kind]
    found = [a["id"] for a in spec.get("added_tokens", []) if a["content"] in names]
    return int(found[0]) if found else None


def source_tokenizer(source_dir: str | None) -> Any | None:
    """The fast tokenizer saved in the model's source directory, if there is one: its special
    ids, BOS rule and chat template are read from it, not guessed from ``tokenizer.json``."""
    if source_dir is None or not (Path(source_dir) / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source_dir, local_files_only=True)
    except Exception:  # a class transformers cannot build here: tokenizer.json is read alone
        return None


def _chat_template(tokenizer: Any | None) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else None


def _adds_bos(tokenizer: Any | None, spec: dict[str, Any], bos: int | None) -> bool:
    """Whether the tokenizer puts BOS first when it encodes (llama.cpp must do the same): asked
    of the tokenizer, or without one read from ``tokenizer.json``'s post-processor template."""
    if bos is None:
        return False
    if tokenizer is not None:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        return bool(ids) and ids[0] == bos
    post = spec.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    for step in steps:
        if step.get("type") == "TemplateProcessing" and step.get("single"):
            first = step["single"][0].get("SpecialToken", {}).get("id")
            ids = step.get("special_tokens", {}).get(first, {}).get("ids", [])
            return ids[:1] == [bos]
    return False
