"""A small, deterministic causal-LM training loop (AdamW + warmup + cosine) and perplexity.

Used to train ``code-llama-tiny`` on CPU. Determinism comes from a fixed seed for the data
sampler, a fixed step count (never a time budget) and a fixed thread count while it runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimline.models.cpu import cpu_bf16_supported
from slimline.models.python_corpus import random_windows


@dataclass(frozen=True)
class TrainSchedule:
    """How long and how hard to train."""

    steps: int
    batch_size: int
    seq_len: int
    lr: float  # peak; small models tolerate (and need) a high LR to learn in few steps
    warmup_steps: int
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio, not to zero
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True  # autocast on CPUs with native bf16 (about 2x faster); fp32 otherwise
    threads: int | None = None  # None: all available cores; 1 for tiny models (no gain, no jitter)


def lr_at(step: int, s: TrainSchedule) -> float:
    """Linear warmup to ``s.lr``, then cosine decay to ``s.lr * s.min_lr_ratio``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return s.lr * (s.min_lr_ratio + (1.0 - s.min_lr_ratio) * cosine)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_causal_lm(
    model: nn.Module,
    stream: torch.Tensor,
    s: TrainSchedule,
    *,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` (a HF causal LM) in place on random windows of ``stream``; return losses.

    ``progress(step, loss)`` is called after every step.
    """
    if s.steps <= 0 or s.batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {s.steps}, {s.batch_size}")
    generator = torch.Generator().manual_seed(s.seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.95), eps=1e-8
    )
    use_bf16 = s.bf16 and cpu_bf16_supported()
    losses: list[float] = []
    model.train()
    for step in range(s.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, s)
        ids = random_windows(stream, s.seq_len, s.batch_size, generator)  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 16) -> float:
    """Token-level perplexity of ``model`` (fp32, eval mode) over ``windows`` (n, T)."""
    if windows.numel() == 0:
        raise ValueError("no windows to evaluate perplexity on")
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]  # (B, T)
        logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V): predict token t+1
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
