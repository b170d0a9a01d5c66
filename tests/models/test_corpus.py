from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from slimline.models.lm_training import TrainSchedule, lr_at
from slimline.models.python_corpus import random_windows, train_bpe_tokenizer, windows
from slimline.models.stdlib_files import SPLITS, files_by_split, split_of, stdlib_files


def test_split_is_a_stable_hash_with_90_5_5_proportions() -> None:
    files = stdlib_files()
    counts = Counter(f.split for f in files)
    assert set(counts) == set(SPLITS)
    assert 0.85 < counts["train"] / len(files) < 0.95
    assert all(f.split == split_of(f.relpath) for f in files)
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    assert not any("test" in f.relpath.split("/")[:-1] for f in files)


def test_sampled_splits_respect_budget_and_stay_disjoint() -> None:
    full = files_by_split(stdlib_files())
    small = files_by_split(stdlib_files(), {"train": 200_000, "validation": 30_000})
    for split in ("train", "validation"):
        assert set(f.relpath for f in small[split]) <= set(f.relpath for f in full[split])
        assert len(small[split]) < len(full[split])
    assert small["test"] == full["test"]  # no budget: untouched


def test_windows() -> None:
    stream = torch.arange(10, dtype=torch.int32)
    w = windows(stream, 4)
    assert w.dtype == torch.int64
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="seq_len"):
        windows(stream, 0)


def test_random_windows_are_contiguous_and_seeded() -> None:
    stream = torch.arange(1000, dtype=torch.int32)
    a = random_windows(stream, 16, 5, torch.Generator().manual_seed(1))
    b = random_windows(stream, 16, 5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 15, dtype=torch.int64))


def test_lr_schedule() -> None:
    s = TrainSchedule(steps=100, batch_size=1, seq_len=8, lr=1.0, warmup_steps=10)
    assert lr_at(0, s) == pytest.approx(0.1)
    assert lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(55, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, s) == pytest.approx(0.1)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(10, 100))


def test_tokenizer_round_trips_any_text() -> None:
    corpus = ["def add(a, b):\n    return a + b\n"] * 20 + ["class A:\n    pass\n"] * 20
    tok = train_bpe_tokenizer(corpus, vocab_size=300, max_length=32)
    for text in ["def add(a, b):\n    return a + b\n", "λ = '日本' \t\r\n  # ok"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(corpus, vocab_size=100, max_length=32)
