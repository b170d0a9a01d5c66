"""Prompt lookup against a brute-force search over every n-gram and start position."""

from __future__ import annotations

import pytest
import torch

from slimline.speculative.lookup import lookup_draft


def _brute_force(tokens: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    t = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n >= t:
            continue
        for start in range(t - n - 1, -1, -1):  # latest first; the final n-gram excluded
            if tokens[start : start + n] == tokens[t - n :]:
                grown = list(tokens)  # copy one token at a time, reading what it wrote
                for i in range(k):
                    grown.append(grown[start + n + i])
                return grown[t:]
    return []


def test_lookup_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        length = int(torch.randint(1, 25, (1,), generator=g))
        alphabet = 2 + trial % 4
        tokens = torch.randint(0, alphabet, (length,), generator=g)
        k = int(torch.randint(1, 6, (1,), generator=g))
        max_ngram = int(torch.randint(1, 5, (1,), generator=g))
        min_ngram = int(torch.randint(1, max_ngram + 1, (1,), generator=g))
        got = lookup_draft(tokens, k, max_ngram, min_ngram).tolist()
        assert got == _brute_force(tokens.tolist(), k, max_ngram, min_ngram), (tokens, k)


def test_lookup_copies_what_followed_the_latest_match() -> None:
    #                      0  1  2  3  4  5  6  7  8  9
    tokens = torch.tensor([5, 6, 7, 8, 5, 6, 9, 1, 5, 6])
    assert lookup_draft(tokens, 3, max_ngram=2).tolist() == [9, 1, 5]  # "5 6" at 4, not 0
    assert lookup_draft(tokens, 3, max_ngram=3).tolist() == [9, 1, 5]  # no 3-gram match
    assert lookup_draft(torch.tensor([1, 2, 3]), 4).tolist() == []  # nothing repeats
    assert lookup_draft(tokens, 0).tolist() == []


def test_lookup_drafts_a_loop_past_the_end_of_the_sequence() -> None:
    # The latest match of "4 2" starts two tokens before the end: what followed it is "4 2"
    # and then the tokens being drafted, so the loop goes on for all k tokens.
    tokens = torch.tensor([7, 4, 2, 4, 2, 4, 2])
    assert lookup_draft(tokens, 5, max_ngram=2).tolist() == [4, 2, 4, 2, 4]
    # Period 3 with a 1-gram match at distance 3.
    assert lookup_draft(torch.tensor([1, 2, 3, 1]), 7, max_ngram=1).tolist() == [2, 3, 1, 2, 3, 1, 2]


def test_lookup_checks_ngram_range() -> None:
    with pytest.raises(ValueError, match="min_ngram"):
        lookup_draft(torch.tensor([1, 2]), 2, max_ngram=1, min_ngram=2)
