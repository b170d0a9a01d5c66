"""``qat``: quantization-aware training with learned step sizes (LSQ, arXiv 1902.08153).

Each selected Linear-like layer is replaced, for the length of the step only, by a
fake-quantized layer: its weight is rounded onto ``rtn``'s grid (same groups, a smaller last
group when ``K`` is not a multiple of ``group_size``, the same code ranges as
:func:`~slimline.quantize.packing.quantize_groups`) in the forward pass, and the model is
trained so that it works *with* the rounding. As in LSQ (Esser et al., §2):

* ``ŵ = round(clamp(w / s, -Q_N, Q_P)) · s`` with one learned step size ``s`` per group,
  initialised from ``rtn``'s scales, so training starts exactly at the ``rtn`` model;
* ``round`` passes gradients straight through (the STE): ``∂ŵ/∂w`` is 1 inside the range
  and 0 where the weight is clipped;
* ``∂ŵ/∂s`` is ``round(w/s) - w/s`` inside the range and ``-Q_N`` / ``Q_P`` where clipped
  (the paper's eq. 3), multiplied by ``g = 1 / sqrt(n · Q_P)`` with ``n`` the weights per
  step size, which keeps the step-size updates in proportion to the weight updates (§2.2).

On the asymmetric grid each group keeps ``rtn``'s integer zero point ``z``, so its code range
is ``[-z, 2^b - 1 - z]`` around zero and pruned weights stay exactly zero.

**Training** is :mod:`slimline.train`'s loop and losses. Calibration batches rarely carry
labels, so by default the model learns to match the original model (data-free distillation
as in LLM-QAT, arXiv 2305.17888); ``loss="task"`` uses the model's own loss on batches that
carry ``labels``. The teacher is the same model with fake quantization switched off and each
layer's original weight: no frozen copy is made. With ``train_weights`` the layers hold
float32 master copies of their weights (the one extra copy of the trained weights any
optimiser needs). Under ``torchrun`` every rank trains its own copy on its share of the
batches, gradients averaged each step, and all ranks end identical.

**Conversion.** During training the step size is rounded to the dtype ``rtn`` stores it in
(float16 when it fits), again with a straight-through gradient, and the codes are those of
the fake-quantized forward, so the :class:`~slimline.quantize.qlinear.QuantLinear` the step
leaves behind computes with exactly the weight the last training step used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.batches import Batch, to_device
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import linear_weight
from slimline.quantize.packing import (
    effective_group,
    expand_groups,
    from_groups,
    quantize_groups,
    to_groups,
)
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.weight_only import WeightGridConfig
from slimline.search.ranges import Choice, SearchSpace
from slimline.train.loop import train_loop
from slimline.train.losses import output_loss, task_loss
from slimline.train.outputs import TeacherOutputs, answer_mask, run_model


@dataclass(frozen=True, kw_only=True)
class QatConfig(WeightGridConfig):
    """QAT: ``rtn``'s grid and packing, weights and step sizes trained through the rounding."""

    method: ClassVar[str] = "qat"
    needs_training: ClassVar[bool] = True  # compress(training=...), default its calibration
    summary: ClassVar[str] = "quantization-aware training, learned step sizes (LSQ), int2–int8"
    paper: ClassVar[str] = "LSQ, Esser et al., arXiv 1902.08153; LLM-QAT, arXiv 2305.17888"
    # What `slimline search` tries (slimline/search/ranges.py); a space file narrows it.
    search_space: ClassVar[SearchSpace] = {"bits": Choice(4, 8), "group_size": Choice(32, 64, 128)}

    # Optimizer steps, one batch per process each. On code-llama-tiny at 2 bits g64 (batches
    # of 4×256 tokens), held-out KL to fp32 falls from rtn's 0.136 to 0.092 after 16 steps,
    # 0.078 after 32, 0.051 after 128: 16 is a quick default, give more for real runs.
    steps: int = 16
    # Adam learning rate of the weights (and biases) of the quantized layers; 0 freezes them.
    # LLM-QAT uses 2e-5 on 7B models; small models tolerate larger steps.
    lr: float = 1e-4
    # Adam learning rate of the step sizes, which are ~10–100× smaller than the weights;
    # Adam's step is about ``lr`` per update, so a few per cent of a scale over a run.
    scale_lr: float = 1e-4
    # "distill": match the original model's outputs (no labels needed); "task": the model's
    # own loss on batches with "labels".
    loss: Literal["distill", "task"] = "distill"
    # Train the latent float weights along with the step sizes (LSQ trains both).
    train_weights: bool = True
    # Seeds the order in which batches are visited; nothing else is random.
    seed: int = 0

    def check(self) -> None:
        super().check()
        if self.steps < 1:
            self.fail("steps", f"must be ≥ 1, got {self.steps}")
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                self.fail(name, f"must be a finite number ≥ 0, got {value}")
        if self.scale_lr == 0.0 and not self.trains_weights:
            self.fail("scale_lr", "is 0 and no weights train (lr 0 or train_weights false)")

    @property
    def trains_weights(self) -> bool:
        """Whether the latent float weights (and biases) are trained, not only step sizes."""
        return self.train_weights and self.lr > 0.0


# --- LSQ maths -----------------------------------------------------------------------------


def lsq_grad_scale(numel_per_scale: int, q_p: int) -> float:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(n · Q_P)`` (arXiv 1902.08153, §2.2)."""
    if numel_per_scale < 1 or q_p < 1:
        raise ValueError(f"need n ≥ 1 and Q_P ≥ 1, got n={numel_per_scale}, Q_P={q_p}")
    return 1.0 / math.sqrt(numel_per_scale * q_p)


def code_range(bits: int, zeros: torch.Tensor | None) -> tuple[Any, Any]:
    """``(-Q_N, Q_P)`` of ``w / s``: scalars when symmetric, per-group (N, G) with zeros."""
    if zeros is None:
        half = 2 ** (bits - 1)
        return -half, half - 1
    z = zeros.float()
    return -z, (2**bits - 1) - z


class LsqQuantize(torch.autograd.Function):
    """LSQ fake quantization of a grouped weight, with the paper's gradients (§2, eq. 3).

    Forward: ``round(clamp(w / s, low, high)) · s`` on ``w`` (N, G, group) and ``s``
    (N, G, 1); ``low``/``high`` are scalars or (N, G, 1). Backward, with ``r = w / s``:
    ``∂ŵ/∂w = 1`` where ``low ≤ r ≤ high``, else 0 (the STE, clipped); ``∂ŵ/∂s`` is
    ``round(r) - r`` inside, ``low`` or ``high`` where clipped, times ``grad_scale``.
    One function instead of autograd through five ops: half the time and one saved tensor.
    """

    @staticmethod
    def forward(
        ctx: Any, w: torch.Tensor, s: torch.Tensor, low: Any, high: Any, grad_scale: float
    ) -> torch.Tensor:
        ratio = w / s
        ctx.save_for_backward(ratio)
        ctx.low, ctx.high, ctx.grad_scale = low, high, grad_scale
        return torch.round(torch.clamp(ratio, low, high)) * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (ratio,) = ctx.saved_tensors
        codes = torch.round(torch.clamp(ratio, ctx.low, ctx.high))
        inside = (ratio >= ctx.low) & (ratio <= ctx.high)
        grad_w = grad * inside
        grad_s = (grad * torch.where(inside, codes - ratio, codes)).sum(-1, keepdim=True)
        return grad_w, grad_s * ctx.grad_scale, None, None, None


class _CastSTE(torch.autograd.Function):
    """Round to ``dtype`` and back forward (the value as stored), identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    low: Any,
    high: Any,
    group: int,
    grad_scale: float,
) -> torch.Tensor:
    """LSQ fake quantization ``round(clamp(w / s, low, high)) · s`` of ``weight`` (N, K).

    ``scales`` (N, G), one per ``group`` columns (the last group cut at K); ``low``/``high``
    the code range from :func:`code_range`. Clamping before rounding gives the paper's
    gradients at the clipped ends; the value equals ``rtn``'s ``clamp(round(w / s))``, the
    bounds being integers, and ``w / s`` is computed elementwise as ``rtn`` does.
    """
    k = weight.shape[1]
    if isinstance(low, torch.Tensor):
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)  # (N, G, 1)
    out = LsqQuantize.apply(to_groups(weight, group), scales.unsqueeze(-1), low, high, grad_scale)
    return from_groups(out, k).contiguous()  # (N, K), laid out as QuantLinear's weight


def lsq_codes(
    weight: torch.Tensor, scales: torch.Tensor, low: Any, high: Any, group: int
) -> torch.Tensor:
    """The (N, K) integer codes ``round(clamp(w / s, low, high))`` of :func:`fake_quantize`
    (float tensor holding integers; signed, relative to the zero point)."""
    k = weight.shape[1]
    if isinstance(low, torch.Tensor):
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)  # (N, G, 1)
    ratio = to_groups(weight.detach(), group) / scales.detach().unsqueeze(-1)
    return from_groups(torch.round(torch.clamp(ratio, low, high)), k)


# --- the train-time layer --------------------------------------------------------------------


class GridLike(Protocol):
    """What a fake-quantized layer reads of its grid: a ``QatConfig`` or a ``QuantLinear``."""

    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int | None: ...
    @property
    def symmetric(self) -> bool: ...
    @property
    def decode_activations(self) -> str: ...


class FakeQuantLinear(nn.Module):
    """A Linear-like layer during QAT: LSQ fake-quantized weight, learned step sizes.

    Train-time only, never saved: :meth:`to_quant_linear` gives the packed layer. With
    ``quantize`` False it computes with the original weight and bias (the teacher).
    Built from a float layer on ``rtn``'s grid (:meth:`from_float`) or from a packed layer
    on its own grid (:meth:`from_quant_linear`: GPTQ's codes and scales are where training
    starts).
    """

    @classmethod
    def from_float(cls, module: nn.Module, cfg: QatConfig) -> FakeQuantLinear:
        """A float Linear-like layer on ``rtn``'s grid: its forward is ``rtn``'s until trained."""
        weight = linear_weight(module).detach()  # (N, K), Conv1D transposed
        _, scales, zeros = quantize_groups(weight, cfg.bits, cfg.group_size, cfg.symmetric)
        return cls(weight, getattr(module, "bias", None), scales, zeros, cfg,
                   train_weights=cfg.trains_weights)  # fmt: skip

    @classmethod
    def from_quant_linear(
        cls, layer: QuantLinear, *, train_weights: bool = True
    ) -> FakeQuantLinear:
        """The packed ``layer`` as a train-time layer on its own grid and step sizes: its
        forward equals the packed layer's (up to float32 summation order) until trained."""
        weight = layer.dequantized_weight(torch.float32)  # (q - z) · s, a fresh tensor
        return cls(weight, layer.bias, layer.scales, layer.zeros, layer,
                   train_weights=train_weights)  # fmt: skip

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        grid: GridLike,
        *,
        train_weights: bool,
    ) -> None:
        """The (N, K) ``weight`` on ``grid`` with step sizes ``scales`` (N, G) and zero points
        ``zeros`` (N, G) or None; the forward rounds step sizes to ``scales``' dtype."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.symmetric = grid.bits, grid.group_size, grid.symmetric
        self.decode_activations = grid.decode_activations
        self.group = effective_group(self.in_features, grid.group_size)
        self.scale_dtype = scales.dtype  # the packed layer's storage: the forward rounds to it
        self.scale_floor = torch.finfo(scales.dtype).tiny  # step sizes stay positive, normal
        q_p = 2 ** (grid.bits - 1) - 1 if grid.symmetric else 2**grid.bits - 1
        self.grad_scale = lsq_grad_scale(self.group, q_p)
        # float32 master weights, contiguous (Conv1D's are transposed) so that F.linear runs
        # the kernel QuantLinear will; shared with the original when frozen and already so.
        master = weight.float().contiguous()
        if train_weights and master.data_ptr() == weight.data_ptr():
            master = master.clone()
        self.weight = nn.Parameter(master, requires_grad=train_weights)
        self.scales = nn.Parameter(scales.detach().float().clone())  # (N, G), the stored values
        self.bias: nn.Parameter | None = None
        if isinstance(bias, torch.Tensor):
            self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=train_weights)
        self.zeros: torch.Tensor | None
        self.register_buffer("zeros", zeros, persistent=False)  # (N, G) uint8 or None
        # The teacher: the original tensors, not registered (not trained, not reduced).
        self.original = (weight.detach(), bias.detach() if isinstance(bias, torch.Tensor) else None)
        self.quantize = True

    def stored_scales(self) -> torch.Tensor:
        """(N, G) step sizes as the packed layer stores them (float32 values)."""
        s = self.scales.clamp(min=self.scale_floor)
        return _CastSTE.apply(s, self.scale_dtype)

    def fake_weight(self) -> torch.Tensor:
        """The (N, K) weight the forward computes with: LSQ fake quantization."""
        low, high = code_range(self.bits, self.zeros)
        return fake_quantize(self.weight, self.stored_scales(), low, high, self.group,
                             self.grad_scale)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias: torch.Tensor | None
        if self.quantize:
            weight, bias = self.fake_weight(), self.bias
        else:
            weight, bias = self.original
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        """The packed layer computing with exactly the current fake-quantized weight."""
        s = self.stored_scales()  # (N, G) float32, representable in scale_dtype
        low, high = code_range(self.bits, self.zeros)
        codes = lsq_codes(self.weight, s, low, high, self.group)  # (N, K) in [low, high]
        if self.zeros is None:
            q = codes.to(torch.int8)
        else:
            z = expand_groups(self.zeros.float(), self.in_features, self.group)
            q = (codes + z).to(torch.uint8)
        original_bias = self.original[1]
        bias = None
        if self.bias is not None and original_bias is not None:
            bias = self.bias.detach().to(original_bias.dtype)
        return QuantLinear.from_codes(
            q, s.to(self.scale_dtype), self.zeros, bias=bias, bits=self.bits,
            group_size=self.group_size, symmetric=self.symmetric,
            decode_activations=self.decode_activations,
        )  # fmt: skip


# --- training ----------------------------------------------------------------------------------


def train_qat(
    model: nn.Module,
    layers: Sequence[FakeQuantLinear],
    batches: Sequence[Batch],
    cfg: QatConfig,
    *,
    progress: bool = False,
) -> list[float]:
    """Train ``layers``' weights and step sizes inside ``model``; returns the step losses."""
    weights = [p for m in layers for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": [m.scales for m in layers], "lr": cfg.scale_lr}]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr})
    teacher = TeacherOutputs(model, batches, as_teacher=lambda: _teacher_mode(layers),
                             owner="qat")  # fmt: skip

    def step_loss(index: int) -> torch.Tensor:
        batch = batches[index]
        if cfg.loss == "task":
            return task_loss(model, batch, field="qat.loss")
        target = teacher(index)
        answer = run_model(model, batch, owner="qat").answer
        mask = answer_mask(batch, answer)
        if target.kind == "logits":
            return output_loss("kl", answer, target.answer, mask)
        return output_loss("mse", answer, target.answer, mask)

    return train_loop(groups, step_loss, len(batches), steps=cfg.steps, seed=cfg.seed,
                      name="qat", lr_fields="lr / scale_lr", progress=progress,
                      model=model)  # fmt: skip


@contextmanager
def _teacher_mode(layers: Sequence[FakeQuantLinear]) -> Iterator[None]:
    """The teacher is the same model with fake quantization off: no frozen copy is made."""
    for layer in layers:
        layer.quantize = False
    try:
        yield
    finally:
        for layer in layers:
            layer.quantize = True


@register(QatConfig)
def apply_qat(model: nn.Module, cfg: QatConfig, ctx: StepContext) -> StepOutcome:
    """Insert fake quantization, train, and convert each selected layer to a QuantLinear."""
    if not ctx.training:
        raise ValueError("qat needs training data: the batches it trains on")
    if cfg.loss == "task":
        for i, batch in enumerate(ctx.training):
            if not isinstance(batch, Mapping) or "labels" not in batch:
                raise ValueError(f"qat.loss: 'task' needs dict batches with 'labels' "
                                 f"(training[{i}] has none)")  # fmt: skip
    chosen = cfg.select_modules(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [to_device(b, device) for b in ctx.training]
    fake = {name: FakeQuantLinear.from_float(module, cfg) for name, module in chosen}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for name, layer in fake.items():
            model.set_submodule(name, layer)
        for p in flags:
            p.requires_grad_(False)  # only the quantized layers train
        model.eval()  # no dropout: the student must match a deterministic teacher
        with torch.enable_grad():
            losses = train_qat(model, list(fake.values()), batches, cfg, progress=ctx.progress)
        for name, layer in fake.items():
            model.set_submodule(name, layer.to_quant_linear())
    except BaseException:
        for name, module in chosen:  # the originals were never written to
            model.set_submodule(name, module)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    group = "per-channel" if cfg.group_size is None else f"groups of {cfg.group_size}"
    notes = [
        f"{len(fake)} layers to int{cfg.bits}, {group}, "
        f"{'symmetric' if cfg.symmetric else 'asymmetric'}",
        f"{cfg.steps} steps, {cfg.loss} loss {losses[0]:.4g} → {losses[-1]:.4g}",
    ]
    return StepOutcome(modules=[name for name, _ in chosen], notes=notes)
