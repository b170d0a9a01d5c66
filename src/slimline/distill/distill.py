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
``norms_and_biases`` only, or ``lora`` adapters (``slimline.peft.lora``, rank ``lora_r``,
scale ``lora_alpha``) on the selected Linear-like layers, merged after training; over a
pruned layer the adapter trains ``(W + ΔW) ⊙ M`` with M its non-zero pattern, so the merged
model is the trained one and keeps every zero.

Quantized layers hold packed codes. With ``quantized: frozen`` (the default) they stay as they
are. With ``quantized: train`` the packed weight-only layers (``QuantLinear``: ``rtn``,
``gptq``, ``awq``, ``hqq``, ``qat``) train through their own rounding: each becomes ``qat``'s
LSQ fake-quantized layer (Esser et al., arXiv 1902.08153) started from its codes and step
sizes — GPTQ's solution is where training begins, not a fresh rounding — its latent weights
and step sizes (at ``scale_lr``) train with the rest, and it is packed again after, on the
same grid. The teacher stays the model before the recipe, so this is QAT by distillation from
the float model (LLM-QAT, arXiv 2305.17888). W8A8 and fp8 layers stay frozen either way.
Pruned float weights stay exactly zero. A packed layer's pruned zeros cannot be told from
weights that rounded to zero (at 2 bits most codes are zero in any layer), so ``quantized:
train`` does not keep them: prune, distill, then quantize — or keep a pruned-then-quantized
model's packed layers frozen. Its note counts the zero codes before and after.

Padding is masked out of every loss. Training is :mod:`slimline.train`'s loop: one or N
processes under ``torchrun``, resumable, with evaluation on a held-out slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from slimline.core.batches import Batch, materialize, split_labels, to_device
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import is_linear_like, linear_weight, select, set_linear_weight
from slimline.distill.trainable import SparsityMasks, holds_trainable, trainable_parameters
from slimline.quantize.qat import FakeQuantLinear
from slimline.quantize.qlinear import QuantLinear
from slimline.train.config import TrainingConfig
from slimline.train.data import count_tokens, hold_out, rebatch
from slimline.train.loop import train_loop
from slimline.train.losses import OutputLoss, hidden_state_loss, output_loss, task_loss_of
from slimline.train.outputs import Outputs, TeacherOutputs, answer_mask, run_model
from slimline.train.recompute import check_checkpointing, gradient_checkpointing

if TYPE_CHECKING:
    from slimline.peft.layer import LoraLinear
    from slimline.peft.lora import LoraConfig


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
    # The adapters of ``trainable: lora``: rank and scale numerator (update (alpha / r)·BA),
    # the lora step's defaults (peft's r = 8, alpha = 2r).
    lora_r: int = 8
    lora_alpha: float = 16.0
    # Built-in name, sl.save directory or Hugging Face directory; None: the model as it was
    # before the recipe.
    teacher: str | None = None
    # MiB of teacher outputs (logits, hidden states) kept from the first epoch for the next
    # ones instead of running the teacher again; past it the teacher runs every step.
    teacher_cache_mb: int = 256
    # Packed weight-only layers (QuantLinear): "frozen" keeps their codes; "train" trains them
    # through their own grid (LSQ from their codes and step sizes) and packs them again.
    quantized: Literal["frozen", "train"] = "frozen"
    # Adam learning rate of those layers' step sizes (qat's default): a step size is ~100×
    # smaller than the weights it scales, and Adam moves a parameter by about lr per step.
    scale_lr: float = 1e-4

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
        if self.lora_r < 1:
            self.fail("lora_r", f"must be ≥ 1, got {self.lora_r}")
        if self.teacher_cache_mb < 0:
            self.fail("teacher_cache_mb", f"must be ≥ 0, got {self.teacher_cache_mb}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0.0):
            self.fail("lora_alpha", f"must be a finite number > 0, got {self.lora_alpha}")
        if not (math.isfinite(self.scale_lr) and self.scale_lr >= 0.0):
            self.fail("scale_lr", f"must be a finite number ≥ 0, got {self.scale_lr}")
        if self.quantized == "train" and self.trainable != "all":
            self.fail("quantized", f"'train' trains packed layers with the rest: it needs "
                                   f"trainable 'all', got {self.trainable!r}")  # fmt: skip

    def lora_config(self) -> LoraConfig:
        """The adapters of ``trainable: lora``: ``lora_r``, ``lora_alpha``, this step's
        targets and seed (A's initialisation)."""
        from slimline.peft.lora import LoraConfig

        return LoraConfig(targets=self.targets, r=self.lora_r, alpha=self.lora_alpha,
                          seed=self.seed)  # fmt: skip

    def needs_original(self) -> bool:
        return self.teacher is None

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Modules whose own parameters train (LoRA: the Linear-like layers it adapts; a
        layer that already carries an adapter is refused)."""
        if self.trainable == "lora":
            from slimline.peft.lora import adapter_targets

            chosen = adapter_targets(model, self.lora_config(), step=step or self.method)
            return [(n, m) for n, m in chosen if is_linear_like(m)]
        if self.quantized == "train":  # packed layers too, trained through their grid
            return select(model, self.targets, accepts=trains_packed, step=step or self.method,
                          what="parameter-holding or packed quantized")  # fmt: skip
        return select(model, self.targets, accepts=holds_trainable, what="parameter-holding",
                      step=step or self.method)  # fmt: skip


# --- the loss ----------------------------------------------------------------------------------


class DistillLoss(nn.Module):
    """The config's weighted loss of a student forward against the teacher's; holds the
    TinyBERT projections (trained, then dropped)."""

    def __init__(self, cfg: DistillConfig, kind: OutputLoss, projections: nn.ModuleList | None):
        super().__init__()
        self.cfg, self.kind, self.projections = cfg, kind, projections

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        mask = answer_mask(batch, student.answer)
        total = torch.zeros((), device=student.answer.device)
        if cfg.output_weight:
            answer = output_loss(self.kind, student.answer, teacher.answer, mask,
                                 temperature=cfg.temperature)  # fmt: skip
            total = total + cfg.output_weight * answer
        if cfg.hidden_weight and student.hidden is not None and teacher.hidden is not None:
            hidden = hidden_state_loss(student.hidden, teacher.hidden, self.projections, mask)
            total = total + cfg.hidden_weight * hidden
        _, labels = split_labels(batch)
        if cfg.task_weight and labels is not None:
            task = task_loss_of(student, labels, field="distill.task_weight")
            total = total + cfg.task_weight * task
        return total


def output_kind(cfg: DistillConfig, student: Outputs) -> OutputLoss:
    """The output loss: ``cfg.output_loss``, or from the model's answer when ``auto``;
    ValueError before training when a forced one does not fit the answer."""
    if cfg.output_loss == "auto":
        if student.kind == "logits":
            return "kl"
        return "cosine" if student.kind == "hidden" else "mse"
    shape = tuple(student.answer.shape)
    if cfg.output_loss == "kl" and student.kind != "logits":
        cfg.fail("output_loss", f"'kl' needs a model that answers logits; this one answers "
                                f"{student.kind} of shape {shape}: use mse or cosine")  # fmt: skip
    if cfg.output_loss == "cosine" and student.answer.dim() != 3:
        cfg.fail("output_loss", f"'cosine' pools token states (B, T, C); this model answers "
                                f"shape {shape}: use mse")  # fmt: skip
    return cfg.output_loss


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


@register(DistillConfig)
def apply_distill(model: nn.Module, cfg: DistillConfig, ctx: StepContext) -> StepOutcome:
    """Train the student toward the teacher; the model is left as trained (or, should the
    training fail, as it was)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = _batches(cfg, ctx, device)
    teacher = resolve_teacher(cfg, ctx, device)
    train, held = hold_out(batches, cfg.eval_fraction)
    train = cfg.regroup(train)
    want_hidden = cfg.hidden_weight > 0
    teach = TeacherOutputs(teacher, train, hidden=want_hidden, owner="distill",
                           cache_bytes=cfg.teacher_cache_mb * 2**20)
    with torch.no_grad():
        first = run_model(model, train[0], hidden=want_hidden, owner="distill")
    check_teacher(first, teach(0), cfg)
    kind = output_kind(cfg, first)
    check_checkpointing(model, cfg.checkpointing, field="distill.checkpointing")
    projections = projections_for(first, teach(0)) if want_hidden else None
    loss_fn = DistillLoss(cfg, kind, projections).to(device)
    chosen = cfg.select_modules(model)
    data = (train, teach)
    packed: list[tuple[str, QuantLinear]] = []
    if cfg.trainable == "lora":
        losses, count, modules = _train_lora(model, cfg, ctx, chosen, loss_fn, data, held)
    else:
        params = trainable_parameters(chosen, cfg.trainable)
        packed = [(n, m) for n, m in chosen if isinstance(m, QuantLinear)]
        if not params and not packed:
            cfg.fail("trainable", f"{cfg.trainable!r} selects no parameter of the targets")
        losses, count = _train_with_packed(model, cfg, ctx, params, packed, loss_fn, data, held)
        modules = sorted({n.rsplit(".", 1)[0] for n in params if "." in n}
                         | {name for name, _ in packed})  # fmt: skip
    notes = [
        f"trained {count} parameters ({cfg.trainable}) on {len(train)} batches, "
        f"{len(held)} held out",
        *([f"{len(packed)} packed layers trained through their grid (LSQ, step sizes at lr "
           f"{cfg.scale_lr:g}) and packed again; zero codes {zero_codes(m for _, m in packed):,}"
           f" → {zero_codes(model.get_submodule(n) for n, _ in packed):,}"] if packed else []),
        f"{len(losses)} steps, total loss ({kind} output term + weighted hidden/task terms) "
        f"{losses[0]:.4g} → {losses[-1]:.4g}",
        *cfg.ranks_note(),
    ]
    return StepOutcome(modules=modules, notes=notes)


def trains_packed(module: nn.Module) -> bool:
    """What ``quantized: train`` selects: parameter-holding float modules and packed layers."""
    return holds_trainable(module) or isinstance(module, QuantLinear)


def zero_codes(layers: Iterable[nn.Module]) -> int:
    """How many weights of the packed ``layers`` are exactly zero (code at the zero point)."""
    return sum(int((m.centred_codes() == 0).sum()) for m in layers if isinstance(m, QuantLinear))


def _train_with_packed(
    model: nn.Module,
    cfg: DistillConfig,
    ctx: StepContext,
    params: dict[str, nn.Parameter],
    packed: list[tuple[str, QuantLinear]],
    loss_fn: DistillLoss,
    data: tuple[list[Batch], TeacherOutputs],
    held: list[Batch],
) -> tuple[list[float], int]:
    """Train ``params`` and the ``packed`` layers through fake quantization, then pack those
    again; on failure every packed layer is put back as it was. The losses and the number of
    trained parameters (latent weights, biases and step sizes of packed layers included)."""
    fakes = {name: FakeQuantLinear.from_quant_linear(layer) for name, layer in packed}
    every = dict(params)
    scales: dict[str, nn.Parameter] = {}
    for name, fake in fakes.items():
        every.update({f"{name}.{p}": t for p, t in fake.named_parameters() if p != "scales"})
        scales[f"{name}.scales"] = fake.scales
    try:
        for name, fake in fakes.items():
            model.set_submodule(name, fake)
        losses = _train(model, cfg, ctx, every, loss_fn, data, held, scales=scales)
        for name, fake in fakes.items():
            model.set_submodule(name, fake.to_quant_linear())
    except BaseException:
        for name, layer in packed:
            model.set_submodule(name, layer)
        raise
    return losses, sum(p.numel() for p in (*every.values(), *scales.values()))


def weight_masks(layers: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """(N, K) non-zero pattern of each layer whose weight has zeros (a pruned layer)."""
    masks: dict[str, torch.Tensor] = {}
    for name, module in layers:
        nonzero = linear_weight(module).detach() != 0
        if not bool(nonzero.all()):
            masks[name] = nonzero
    return masks


def _train_lora(
    model: nn.Module,
    cfg: DistillConfig,
    ctx: StepContext,
    layers: list[tuple[str, nn.Module]],
    loss_fn: DistillLoss,
    data: tuple[list[Batch], TeacherOutputs],
    held: list[Batch],
) -> tuple[list[float], int, list[str]]:
    """Adapt ``layers`` (masked where pruned), train the adapters, merge them; the losses,
    the adapter parameter count and the adapted layers. On any failure the adapters are
    removed and every weight and ``requires_grad`` flag is as it was."""
    from slimline.peft.lora import add_adapters, merge_adapters, remove_adapters

    if not layers:
        cfg.fail("trainable", "'lora' selects no Linear-like layer of the targets")
    flags = {p: p.requires_grad for p in model.parameters()}  # before the adapters exist
    adapters: dict[str, LoraLinear] = {}
    merged: dict[str, torch.Tensor] = {}
    try:
        adapters = add_adapters(model, cfg.lora_config(), layers, freeze=False,
                                masks=weight_masks(layers))  # fmt: skip
        params = {f"{name}.{pname}": p for name, adapter in adapters.items()
                  for pname, p in adapter.named_parameters()
                  if not pname.startswith("base_layer.")}  # fmt: skip
        losses = _train(model, cfg, ctx, params, loss_fn, data, held)
        for name, adapter in adapters.items():  # layer by layer, each undoable exactly
            merged[name] = linear_weight(adapter.base_layer).detach().to("cpu", copy=True)
            merge_adapters(model, names={name})
    except BaseException:
        for name, weight in merged.items():
            set_linear_weight(adapters[name].base_layer, weight)
        remove_adapters(model, adapters)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        raise
    return losses, sum(p.numel() for p in params.values()), sorted(adapters)


def _train(
    model: nn.Module,
    cfg: DistillConfig,
    ctx: StepContext,
    params: dict[str, nn.Parameter],
    loss_fn: DistillLoss,
    data: tuple[list[Batch], TeacherOutputs],
    held: list[Batch],
    *,
    scales: dict[str, nn.Parameter] | None = None,
) -> list[float]:
    """Run the loop on ``params`` (and the projections, and packed layers' step ``scales`` at
    ``cfg.scale_lr``); restores the model on failure."""
    train, teach = data
    want_hidden = cfg.hidden_weight > 0
    held_teacher = teach.on(held)
    masks = SparsityMasks(model, params)
    saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training

    def step_loss(index: int) -> torch.Tensor:
        batch = train[index]
        student = run_model(model, batch, hidden=want_hidden, labels=True, owner="distill")
        return loss_fn(student, teach(index), batch)

    def evaluate() -> float:
        total = 0.0
        for i, batch in enumerate(held):
            student = run_model(model, batch, hidden=want_hidden, labels=True, owner="distill")
            total += float(loss_fn(student, held_teacher(i), batch))
        return total / len(held)

    groups: list[dict[str, Any]] = [{"params": list(params.values()), "lr": cfg.lr}]
    if scales:
        groups.append({"params": list(scales.values()), "lr": cfg.scale_lr})
    if loss_fn.projections is not None and any(True for _ in loss_fn.projections.parameters()):
        groups.append({"params": list(loss_fn.projections.parameters()), "lr": cfg.lr})
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in (*params.values(), *(scales or {}).values()):
            p.requires_grad_(True)
        model.eval()  # no dropout: the student learns a deterministic teacher
        recompute = gradient_checkpointing(model, cfg.checkpointing, field="distill.checkpointing")
        with torch.enable_grad(), recompute:
            losses = train_loop(
                groups, step_loss, len(train), steps=cfg.steps, seed=cfg.seed, name="distill",
                progress=ctx.progress, options=cfg.loop_options(),
                evaluate=evaluate if held else None, after_step=masks.reapply,
                before_update=masks.mask_gradients, model=model,
                tokens=lambda i: count_tokens(train[i]),
            )  # fmt: skip
    except BaseException:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return losses
