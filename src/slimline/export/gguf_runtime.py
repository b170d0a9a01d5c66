"""A GGUF export run by llama.cpp (through llama-cpp-python), as a torch causal LM is called.

``slimline eval --model <gguf export>`` measures what llama.cpp makes of the file beside the
torch model: its logits (perplexity, KL and agreement with the baseline), the latency of a
forward over a batch, and greedy decode speed (``generate``). llama.cpp runs one sequence at a
time: each row of a batch is evaluated from an empty cache on its real tokens (the attention
mask's ones, which must be one run: left or right padding), and its logits are placed at those
positions (zeros at the padding, which the metrics never read).

llama-cpp-python is not a dependency of slimline: it builds llama.cpp from source when it is
installed. Without it, running a GGUF export is refused with the install command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def open_llama(file: Path, *, threads: int, context: int, logits_all: bool) -> Any:
    """llama.cpp's model of ``file`` with a ``context``-token cache on ``threads`` threads;
    ``logits_all``: keep every position's logits (scoring), else the last only (decode)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise ImportError("running a GGUF export needs llama.cpp's Python binding: pip install "
                          "llama-cpp-python (it builds llama.cpp from source)") from None
    return Llama(model_path=str(file), n_ctx=context, n_batch=min(context, 512),
                 n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                 verbose=False)


def context_for(tokens: int) -> int:
    """The cache size opened for ``tokens`` tokens: the next power of two, at least 64 (a
    longer input later opens a larger one)."""
    return max(64, 1 << max(tokens - 1, 0).bit_length())


def real_span(mask: torch.Tensor) -> slice:
    """The positions of one row whose mask is 1, as one slice; ValueError when they are not
    one run (llama.cpp evaluates a sequence, not a masked set)."""
    where = torch.nonzero(mask).flatten()
    if where.numel() == 0:
        return slice(0, 0)
    start, stop = int(where[0]), int(where[-1]) + 1
    if where.numel() != stop - start:
        raise ValueError("llama.cpp: a row's attention mask must be one run of ones (left or "
                         "right padding), not gaps")
    return slice(start, stop)


def score(llm: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
          vocab: int) -> torch.Tensor:
    """(batch, length, vocab) float32 logits of ``input_ids`` from ``llm`` (opened with
    ``logits_all``), row by row from an empty cache; zeros at padded positions."""
    batch, length = input_ids.shape
    out = torch.zeros(batch, length, vocab)
    for row in range(batch):
        span = real_span(attention_mask[row]) if attention_mask is not None \
            else slice(0, length)
        tokens = input_ids[row, span].tolist()
        if not tokens:
            continue
        llm.reset()
        llm.eval(tokens)
        out[row, span] = torch.from_numpy(np.asarray(llm.scores[: len(tokens)],
                                                     dtype=np.float32)[:, :vocab])
    return out


def greedy(llm: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """``new_tokens`` tokens of greedy decoding from ``prompt``, from an empty cache; an
    end-of-sequence token does not stop it (as ``min_new_tokens`` asks)."""
    produced: list[int] = []
    if new_tokens <= 0:
        return produced
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        produced.append(int(token))
        if len(produced) == new_tokens:
            break
    return produced
