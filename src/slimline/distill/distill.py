"""``distill``: recover a compressed model by learning from the model it was.

The student is the model as the earlier steps left it; the teacher is, by default, the model
as it was before the recipe (``compress`` keeps it: the input model itself, or a frozen copy
with ``inplace=True``), or ``teacher: <built-in name | sl.save directory | HF directory>``.
The loss mixes, with the weights of the config:

* the **output** loss, chosen from what the model answers: for logits the KL divergence of
  the temperature-softened distributions times ``T²`` (Hinton et al., arXiv 1503.02531); for
  sentence encoders (``last_hidden_state`` only, e.g. ``minilm``'s BertModel) ``1 - cos`` of
  the mask-aware mean-pooled embeddings; for a plain tensor the squared error relative to
  the teacher's energy (``output_loss`` overrides the choice);
* the **hidden-state** loss of TinyBERT (arXiv 1909.10351): each student layer against the
  uniformly mapped teacher layer, through a learned projection where the widths differ
  (the projections are trained with the student and dropped after);
* the **task** loss, the model's own loss on batches that carry ``labels``.

``trainable`` (PERP, arXiv 2312.15230): ``all`` float parameters of the selected modules,
``norms_and_biases`` only, or ``lora`` adapters (``slimline.peft.lora``). Quantized layers
(``QuantLinear``, W8A8, fp8: any :mod:`slimline.quantize` layer) stay **frozen**: they hold
packed codes; train through the rounding with ``qat`` instead. Pruned weights stay exactly
zero. Padding is masked out of every loss. Training is :mod:`slimline.train`'s loop: one or
N processes under ``torchrun``, resumable, with evaluation on a held-out slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.batches import Batch, materialize, split_labels, to_device
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import select
from slimline.distill.outputs import Outputs, TeacherOutputs, positions_mask, run_model
from slimline.distill.trainable import SparsityMasks, holds_trainable, trainable_parameters
from slimline.train.config import TrainingConfig
from slimline.train.data import count_tokens, hold_out, rebatch
from slimline.train.loop import train_loop
from slimline.train.losses import (
    distill_loss,
    hidden_state_loss,
    kl_with_temperature,
    pooled_cosine_loss,
)
from slimline.train.recompute import gradient_checkpointing


@dataclass(frozen=True, kw_only=True)
class DistillConfig(TrainingConfig):
    """Knowledge distillation from the pre-recipe model (or ``teacher``) into the student."""

    method: ClassVar[str] = "distill"
    summary: ClassVar[str] = "knowledge distillation: logit KL (×T²), hidden states, cosine"
    paper: ClassVar[str] = "Hinton arXiv 1503.02531; TinyBERT arXiv 1909.10351; PERP 2312.15230"

    # Softmax temperature of the logit KL; 1 matches the distributions as they are, which
    # is what recovery after compression wants (the student should become the teacher).
    temperature: float = 1.0
    output_loss: Literal["auto", "kl", "cosine", "mse"] = "auto"
    output_weight: float = 1.0
    # TinyBERT's layer-wise loss; 0 skips the hidden states (cheaper, no projections).
    hidden_weight: float = 0.0
    # Mixed in only on batches that carry ``labels``.
    task_weight: float = 0.5
    trainable: Literal["all", "lora", "norms_and_biases"] = "all"
    # Built-in name, sl.save directory or Hugging Face directory; None: the model as it was
    # before the recipe.
    teacher: str | None = None

    def check(self) -> None:
        super().check()
        if not (math.isfinite(self.temperature) and self.temperature > 0.0):
            self.fail("temperature", f"must be a finite number > 0, got {self.temperature}")
        for name in ("output_weight", "hidden_weight", "task_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                self.fail(name, f"must be a finite number ≥ 0, got {value}")
        if self.output_weight == self.hidden_weight == self.task_weight == 0.0:
            self.fail("output_weight", "all loss weights are 0: nothing to learn")

    def needs_original(self) -> bool:
        return self.teacher is None

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Modules whose own parameters train (LoRA: the Linear-like layers it adapts)."""
        if self.trainable == "lora":
            return super().select_modules(model, step=step)
        return select(model, self.targets, accepts=holds_trainable, what="parameter-holding",
                      step=step or self.method)  # fmt: skip


# --- the loss ----------------------------------------------------------------------------------


class DistillLoss(nn.Module):
    """The config's weighted loss of a student forward against the teacher's; holds the
    TinyBERT projections (trained, then dropped)."""

    def __init__(self, cfg: DistillConfig, kind: str, projections: nn.ModuleList | None):
        super().__init__()
        self.cfg, self.kind, self.projections = cfg, kind, projections

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        mask = positions_mask(batch, student.answer)
        total = torch.zeros((), device=student.answer.device)
        if cfg.output_weight:
            total = total + cfg.output_weight * self.output(student.answer, teacher.answer, mask)
        if cfg.hidden_weight and student.hidden is not None and teacher.hidden is not None:
            hidden = hidden_state_loss(student.hidden, teacher.hidden, self.projections, mask)
            total = total + cfg.hidden_weight * hidden
        _, labels = split_labels(batch)
        if cfg.task_weight and labels is not None:
            total = total + cfg.task_weight * _task(student, labels)
        return total

    def output(self, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "kl":
            return kl_with_temperature(s, t, self.cfg.temperature, mask)
        if self.kind == "cosine":
            return pooled_cosine_loss(s, t, mask)
        return distill_loss(s.float(), t.float(), False, mask)


def _task(student: Outputs, labels: torch.Tensor) -> torch.Tensor:
    if student.loss is not None:  # Hugging Face heads shift causal-LM labels themselves
        return student.loss
    logits = student.answer.float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


def output_kind(cfg: DistillConfig, kind: str) -> str:
    """The output loss: ``cfg.output_loss``, or from the model's answer when ``auto``."""
    if cfg.output_loss != "auto":
        return cfg.output_loss
    return {"logits": "kl", "hidden": "cosine"}.get(kind, "mse")


def check_teacher(student: Outputs, teacher: Outputs, cfg: DistillConfig) -> None:
    """ValueError before training when the teacher answers in another shape or vocabulary."""
    s, t = student.answer, teacher.answer
    if student.kind != teacher.kind:
        cfg.fail("teacher", f"answers {teacher.kind}, the student {student.kind}")
    if student.kind == "logits" and s.shape[-1] != t.shape[-1]:
        cfg.fail("teacher", f"vocabulary of {t.shape[-1]} differs from the student's "
                            f"{s.shape[-1]}")  # fmt: skip
    if s.shape != t.shape:
        cfg.fail("teacher", f"output shape {tuple(t.shape)} differs from the student's "
                            f"{tuple(s.shape)}")  # fmt: skip
    if cfg.hidden_weight and (student.hidden is None or teacher.hidden is None):
        cfg.fail("hidden_weight", "needs models that return hidden_states (Hugging Face)")


def projections_for(student: Outputs, teacher: Outputs) -> nn.ModuleList | None:
    """TinyBERT's ``W_h`` per student layer where its width differs from the teacher's."""
    if student.hidden is None or teacher.hidden is None:
        return None
    width = teacher.hidden[-1].shape[-1]
    layers = [nn.Identity() if h.shape[-1] == width else nn.Linear(h.shape[-1], width, bias=False)
              for h in student.hidden]  # fmt: skip
    return nn.ModuleList(layers)


# --- the handler -------------------------------------------------------------------------------


def resolve_teacher(cfg: DistillConfig, ctx: StepContext, device: torch.device) -> nn.Module:
    """The teacher model: ``cfg.teacher`` loaded, or the pre-recipe model from ``ctx``."""
    if cfg.teacher is None:
        if ctx.original is None:
            cfg.fail("teacher", "no teacher: give teacher (a model name or directory), or "
                     "run distill through sl.compress, which keeps the original")
        return ctx.original
    from slimline.sources import resolve_model

    return resolve_model(cfg.teacher).model.to(device).eval()


def _batches(cfg: DistillConfig, ctx: StepContext, device: torch.device) -> list[Batch]:
    if not ctx.training:
        cfg.fail("steps", "distill needs training data: pass training= (or calibration=)")
    batches = materialize(ctx.training, where="training")  # NaN / inf named here
    if cfg.batch_size is not None:
        batches = rebatch(batches, cfg.batch_size, field=f"{cfg.method}.batch_size")
    return [to_device(b, device) for b in batches]


def _lora_parameters(model: nn.Module, cfg: DistillConfig) -> dict[str, nn.Parameter]:
    """Add LoRA adapters to the selected layers; their parameters are what trains."""
    try:
        from slimline.peft.lora import LoraConfig, add_adapters
    except ImportError as exc:
        raise ValueError(f"distill.trainable: 'lora' needs slimline.peft.lora ({exc})") from None
    before = {id(p) for p in model.parameters()}
    add_adapters(model, LoraConfig(targets=cfg.targets))
    return {n: p for n, p in model.named_parameters() if id(p) not in before}


@register(DistillConfig)
def apply_distill(model: nn.Module, cfg: DistillConfig, ctx: StepContext) -> StepOutcome:
    """Train the student toward the teacher; the model is left as trained (or, should the
    training fail, as it was)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = _batches(cfg, ctx, device)
    teacher = resolve_teacher(cfg, ctx, device)
    train, held = hold_out(batches, cfg.eval_fraction)
    want_hidden = cfg.hidden_weight > 0
    teach = TeacherOutputs(teacher, train, hidden=want_hidden)
    with torch.no_grad():
        first = run_model(model, train[0], hidden=want_hidden, labels=False)
    check_teacher(first, teach(0), cfg)
    projections = projections_for(first, teach(0)) if want_hidden else None
    loss_fn = DistillLoss(cfg, output_kind(cfg, first.kind), projections).to(device)
    chosen = cfg.select_modules(model)
    if cfg.trainable == "lora":  # merging the adapters must keep the base's zeros
        weights = {n: getattr(m, "weight", None) for n, m in chosen}
        base = SparsityMasks(model, {n: w for n, w in weights.items()
                                     if isinstance(w, nn.Parameter)})  # fmt: skip
        params = _lora_parameters(model, cfg)
    else:
        params = trainable_parameters(chosen, cfg.trainable)
    if not params:
        cfg.fail("trainable", f"{cfg.trainable!r} selects no parameter of the targets")
    losses = _train(model, cfg, ctx, params, loss_fn, (train, teach), held)
    if cfg.trainable == "lora":
        _merge_lora(model)
        base.reapply()
    kind = loss_fn.kind
    notes = [
        f"trained {sum(p.numel() for p in params.values())} parameters ({cfg.trainable}) "
        f"on {len(train)} batches, {len(held)} held out",
        f"{len(losses)} steps, {kind} loss {losses[0]:.4g} → {losses[-1]:.4g}",
    ]
    modules = sorted({n.rsplit(".", 1)[0] for n in params if "." in n})
    return StepOutcome(modules=modules, notes=notes)


def _train(
    model: nn.Module,
    cfg: DistillConfig,
    ctx: StepContext,
    params: dict[str, nn.Parameter],
    loss_fn: DistillLoss,
    data: tuple[list[Batch], TeacherOutputs],
    held: list[Batch],
) -> list[float]:
    """Run the loop on ``params`` (and the projections); restores the model on failure."""
    train, teach = data
    want_hidden = cfg.hidden_weight > 0
    held_teacher = TeacherOutputs(teach.teacher, held, hidden=want_hidden)
    masks = SparsityMasks(model, params)
    saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training

    def step_loss(index: int) -> torch.Tensor:
        batch = train[index]
        student = run_model(model, batch, hidden=want_hidden, labels=True)
        return loss_fn(student, teach(index), batch)

    def evaluate() -> float:
        total = 0.0
        for i, batch in enumerate(held):
            student = run_model(model, batch, hidden=want_hidden, labels=True)
            total += float(loss_fn(student, held_teacher(i), batch))
        return total / len(held)

    groups: list[dict[str, Any]] = [{"params": list(params.values()), "lr": cfg.lr}]
    if loss_fn.projections is not None and any(True for _ in loss_fn.projections.parameters()):
        groups.append({"params": list(loss_fn.projections.parameters()), "lr": cfg.lr})
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        masks.mask_gradients()
        model.eval()  # no dropout: the student learns a deterministic teacher
        recompute = gradient_checkpointing(model, cfg.checkpointing, field="distill.checkpointing")
        with torch.enable_grad(), recompute:
            losses = train_loop(
                groups, step_loss, len(train), steps=cfg.steps, seed=cfg.seed, name="distill",
                progress=ctx.progress, options=cfg.loop_options(),
                evaluate=evaluate if held else None, after_step=masks.reapply,
                tokens=lambda i: count_tokens(train[i]),
            )  # fmt: skip
    except BaseException:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        raise
    finally:
        masks.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return losses


def _merge_lora(model: nn.Module) -> None:
    """Fold trained LoRA adapters into their layers when slimline.peft offers it."""
    from slimline.peft import lora

    merge = getattr(lora, "merge_adapters", None)
    if merge is not None:
        merge(model)
