"""What the training loop can be asked to do beyond plain steps: one validated dataclass.

The loop's own knobs (optimizer, schedule, precision, accumulation, evaluation, resumable
checkpoints) live here so that every training step (``qat``, ``distill``, ``lora``) shares
them; a step config exposes them as flat recipe fields through
:class:`slimline.train.config.TrainingConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

OptimizerName = Literal["adamw", "adam", "sgd"]
ShardingName = Literal["ddp", "fsdp"]


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """Options of :func:`slimline.train.loop.train_loop`; the defaults are a plain run."""

    # AdamW (decoupled weight decay, arXiv 1711.05101) is the default; with weight_decay 0 it
    # computes exactly what Adam does.
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.0
    # Optimizer steps of linear warm-up before the cosine decay to 0.
    warmup: int = 0
    # Micro-batches per optimizer step on each process (gradient accumulation).
    accumulation: int = 1
    # bf16 autocast of the forward (CPU and GPU); parameters stay in their own dtype.
    autocast: bool = False
    # Parameters held in bf16/fp16 get float32 master copies the optimizer updates, so that
    # updates smaller than the low-precision step are not lost (mixed precision, 1710.03740).
    master_weights: bool = True
    # Clip the global gradient norm to this value (None: no clipping).
    max_grad_norm: float | None = None
    # Evaluate every this many steps (0: never); stop after ``patience`` evaluations without
    # improvement (0: never stop early). The best evaluated parameters are kept.
    eval_every: int = 0
    patience: int = 0
    # Directory of the resumable checkpoint (safetensors, JSON state in its header), written
    # every ``checkpoint_every`` steps by rank 0; a run started on it resumes from it.
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    # Under torchrun: "ddp" keeps the whole model on every rank and averages gradients;
    # "fsdp" shards parameters, gradients and optimizer state over the ranks (FSDP2).
    sharding: ShardingName = "ddp"

    def __post_init__(self) -> None:
        for name in ("warmup", "eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        if self.accumulation < 1:
            raise ValueError(f"accumulation: must be ≥ 1, got {self.accumulation}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay: must be a finite number ≥ 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0.0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.sharding not in ("ddp", "fsdp"):
            raise ValueError(f"sharding: must be 'ddp' or 'fsdp', got {self.sharding!r}")
        if self.patience and not self.eval_every:
            raise ValueError("patience: early stopping needs eval_every > 0")
