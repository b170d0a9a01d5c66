"""What loading a built-in model gives you: the model, its tokenizer, its task and its data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.models.stdlib_files import SPLITS, Split

Task: TypeAlias = Literal["causal-lm", "embedding", "classification"]
# (split, batch_size, limit in batches) -> batches; arguments validated by Builtin.batches
BatchMaker: TypeAlias = Callable[[Split, int, int | None], list[Batch]]


@dataclass
class Builtin:
    """A built-in model, freshly loaded: fp32, in ``eval()`` mode, the caller's to mutate.

    ``task`` tells the evaluator how to score it: ``causal-lm`` (perplexity from
    ``input_ids``), ``embedding`` (attention-masked mean of ``last_hidden_state``) or
    ``classification`` (logits against the batch's ``"labels"``).
    """

    name: str
    model: nn.Module
    tokenizer: Any | None
    task: Task
    make_batches: BatchMaker = field(repr=False)
    # The local Hugging Face directory the model was read from, when it has one (minilm): its
    # tokenizer and sentence-transformers files go along when a compressed copy is saved.
    directory: Path | None = None

    def batches(
        self,
        split: Literal["train", "validation", "test"],
        *,
        batch_size: int,
        limit: int | None = None,
    ) -> list[Batch]:
        """Batches of ``split`` in a fixed, deterministic order.

        ``limit`` caps the number of *batches* (``None``: the whole split); only the last
        batch of the split may be smaller than ``batch_size``. Every call builds fresh
        tensors, so callers may modify them.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return self.make_batches(split, batch_size, limit)


def slice_batches(
    tensors: Mapping[str, torch.Tensor], batch_size: int, limit: int | None
) -> list[Batch]:
    """Cut aligned tensors (same first dimension) into at most ``limit`` dict batches."""
    n = min(t.shape[0] for t in tensors.values())
    if limit is not None:
        n = min(n, limit * batch_size)
    return [
        {k: t[start : min(start + batch_size, n)].clone() for k, t in tensors.items()}
        for start in range(0, n, batch_size)
    ]
