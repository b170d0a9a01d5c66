"""Prompt lookup: drafts copied from an earlier occurrence of the context's last n-gram.

Prompt lookup decoding (Saxena, 2023; transformers' ``prompt_lookup_num_tokens``) costs no
model at all: when the last ``n`` tokens already occurred earlier in the sequence, the tokens
that followed that occurrence are proposed as the draft. It pays off where the output repeats
its input (editing code, quoting, summarising with copied spans). The longest n-gram that
matches is tried first (``max_ngram`` down to ``min_ngram``); of its earlier occurrences the
most recent one is used, as nearby text is the likeliest to be repeated.

The copy overlaps like an LZ77 back-reference (Ziv & Lempel, 1977): when what followed the
match runs into the end of the sequence, the draft goes on copying from the tokens it has
just drafted, i.e. it repeats the span from the match to the end. A loop the model has
fallen into (``a b a b``: the latest match of ``a b`` leaves only two tokens before the end)
is then drafted ``k`` tokens long instead of being cut at the end of the sequence.
"""

from __future__ import annotations

import torch


def lookup_draft(
    tokens: torch.Tensor, k: int, max_ngram: int = 3, min_ngram: int = 1
) -> torch.Tensor:
    """``k`` tokens that followed the latest earlier match of ``tokens``' last n-gram (copied
    with overlap, see the module docstring), for n from ``max_ngram`` down to ``min_ngram``;
    empty when nothing matches.

    ``tokens`` (T,) int: the sequence so far (prompt and generated tokens).
    """
    if not 1 <= min_ngram <= max_ngram:
        raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
    length = tokens.numel()
    empty = tokens.new_empty(0)
    if k < 1:
        return empty
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        starts = match_starts(tokens, n)
        if starts.numel():
            start = int(starts[-1]) + n  # the latest match, and what followed it
            return overlapping_copy(tokens[start:], k)
    return empty


def overlapping_copy(span: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` tokens of ``span`` (m ≥ 1,) repeated: an LZ77 copy of distance ``m``
    reading past the end of what it copies from."""
    return span.repeat(-(-k // span.numel()))[:k]


def match_starts(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending start positions ``s < T − n`` where ``tokens[s:s+n]`` equals the last ``n``
    tokens (the final occurrence itself excluded): (T,), n → (m,) int."""
    windows = tokens[:-1].unfold(0, n, 1)  # (T - n, n): every n-gram that has a successor
    return (windows == tokens[-n:]).all(dim=1).nonzero().flatten()
