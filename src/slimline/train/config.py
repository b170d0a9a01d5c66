"""The recipe fields every training step shares (``distill``, ``lora``): one base config.

A training step's config inherits :class:`TrainingConfig` and adds its own fields; the
shared ones read the same in every recipe (ARCHITECTURE.md: ``steps``, ``lr``,
``batch_size``) and map onto the loop's :class:`~slimline.train.options.LoopOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

from slimline.core.batches import Batch, batch_size
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.train.data import group_by_length
from slimline.train.options import LoopOptions, OptimizerName, ShardingName


@dataclass(frozen=True, kw_only=True)
class TrainingConfig(MethodConfig):
    """Fields of every training step; subclasses set ``method`` and add theirs."""

    family: ClassVar[Family] = Family.TRAIN
    needs_training: ClassVar[bool] = True  # compress(training=...), default its calibration

    # Optimizer steps (each of ``accumulation`` batches per process).
    steps: int = 64
    # Peak learning rate, reached after ``warmup`` steps, then a cosine to 0.
    lr: float = 1e-4
    # Samples per batch: the training batches are cut (or joined) to this many rows;
    # None trains on the batches as given.
    batch_size: int | None = None
    # Batch samples of similar length together (re-padded; train/data.group_by_length), so
    # padding costs no compute; the batch order is still shuffled every epoch. Text batches
    # only (dict batches with an attention_mask).
    group_by_length: bool = False
    # Seeds the batch order and any dropout; nothing else is random.
    seed: int = 0
    optimizer: OptimizerName = "adamw"
    weight_decay: float = 0.0
    warmup: int = 0
    accumulation: int = 1
    # bf16 autocast of the forward, float32 master weights for bf16/fp16 parameters.
    autocast: bool = False
    master_weights: bool = True
    # Gradient checkpointing of Hugging Face models (recompute activations in backward).
    checkpointing: bool = False
    max_grad_norm: float | None = 1.0
    # Share of the training batches held out for evaluation (0: none); evaluated every
    # ``eval_every`` steps, stopped after ``patience`` evaluations without improvement.
    eval_fraction: float = 0.0
    eval_every: int = 0
    patience: int = 0
    # Resumable checkpoint directory, written every ``checkpoint_every`` steps.
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    # Under torchrun: "ddp" (a whole copy per rank) or "fsdp" (parameters, gradients and
    # optimizer state sharded over the ranks with torch's fully_shard).
    sharding: ShardingName = "ddp"

    def check(self) -> None:
        super().check()
        if self.steps < 1:
            self.fail("steps", f"must be ≥ 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0.0):
            self.fail("lr", f"must be a finite number > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            self.fail("batch_size", f"must be ≥ 1, got {self.batch_size}")
        if not 0.0 <= self.eval_fraction < 1.0:
            self.fail("eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
        if self.warmup >= self.steps and self.warmup:
            self.fail("warmup", f"must be < steps ({self.steps}), got {self.warmup}")
        if self.checkpoint_every and not self.checkpoint_dir:
            self.fail("checkpoint_every", "needs checkpoint_dir")
        try:
            self.loop_options()
        except ValueError as exc:
            field_name, _, message = str(exc).partition(": ")
            self.fail(field_name, message)

    def ranks_note(self) -> list[str]:
        """The note of a run under torchrun (the ranks and how the model was held); none in
        one process."""
        from slimline.train.loop import world

        size = world()[1]
        if size == 1:
            return []
        held = ("sharded over the ranks (FSDP2)" if self.sharding == "fsdp"
                else "whole on each rank (DDP)")  # fmt: skip
        return [f"{size} processes, the model {held}, global batch {size * self.accumulation} "
                "micro-batches a step"]

    def regroup(self, train: list[Batch]) -> list[Batch]:
        """``train`` re-batched by length when ``group_by_length`` (after the hold-out, which
        keeps its own samples), else as it is."""
        if not self.group_by_length:
            return train
        size = self.batch_size or batch_size(train[0])
        return group_by_length(train, size, field=f"{self.method}.group_by_length")

    def loop_options(self) -> LoopOptions:
        """The loop's options from these fields (checkpoints every step when only a
        directory is given)."""
        shared = {f.name: getattr(self, f.name) for f in fields(LoopOptions)}
        shared["checkpoint_every"] = self.checkpoint_every or (1 if self.checkpoint_dir else 0)
        return LoopOptions(**shared)
