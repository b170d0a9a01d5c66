"""Prompt lookup: drafts copied from an earlier occurrence of the context's last n-gram.

Prompt lookup decoding (Saxena, 2023; transformers' ``prompt_lookup_num_tokens``) costs no
model at all: when the last ``n`` tokens already occurred earlier in the sequence, the tokens
that followed that occurrence are proposed as the draft. It pays off where the output repeats
its input (editing code, quoting, summarising with copied spans). The longest n-gram that
matches is tried first (``max_ngram`` down to ``min_ngram``); of its earlier occurrences the
most recent one is used, as nearby text is the likeliest to be repeated.
"""

from __future__ import annotations

import torch


def lookup_draft(
    tokens: torch.Tensor, k: int, max_ngram: int = 3, min_ngram: int = 1
) -> torch.Tensor:
    """Up to ``k`` tokens (≤ k,) that followed the latest earlier match of ``tokens``' last
    n-gram, for n from ``max_ngram`` down to ``min_ngram``; empty when nothing matches.

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
            return tokens[start : start + k]
    return empty


def match_starts(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending start positions ``s < T − n`` where ``tokens[s:s+n]`` equals the last ``n``
    tokens (the final occurrence itself excluded): (T,), n → (m,) int."""
    windows = tokens[:-1].unfold(0, n, 1)  # (T - n, n): every n-gram that has a successor
    return (windows == tokens[-n:]).all(dim=1).nonzero().flatten()
