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

**The loss.** Calibration batches rarely carry labels, so by default the model learns to
match the original model (data-free distillation as in LLM-QAT, arXiv 2305.17888): KL
divergence of the next-token (or class) distributions where the model gives ``logits``,
mean squared error relative to the teacher's energy for hidden states (per token) and plain
tensors. ``loss="task"`` uses the model's own loss on batches that carry ``labels``.

**The teacher without a second model.** The teacher is the same model with fake
quantization switched off and each layer's original weight: no frozen copy is made. Its
targets are cached per batch while they fit in :data:`TEACHER_CACHE_BYTES` (then each
batch's teacher pass runs once), else recomputed at each step. With ``train_weights`` the
layers hold float32 master copies of their weights (the one extra copy of the trained
weights any optimiser needs).

**Conversion.** During training the step size is rounded to the dtype ``rtn`` stores it in
(float16 when it fits), again with a straight-through gradient, and the codes are those of
the fake-quantized forward, so the :class:`~slimline.quantize.qlinear.QuantLinear` the step
leaves behind computes with exactly the weight the last training step used.

**Distributed.** Under ``torchrun`` (``torch.distributed`` initialised, gloo on CPU) every
rank runs this same code on its own model copy: rank ``r`` of ``W`` takes the batches
``t·W + r`` of a shared, seeded order at step ``t``, gradients are averaged with one
``all_reduce`` per step, and parameters start from rank 0's, so all ranks end identical.
One process is the case ``W = 1``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimline.core.batches import Batch, forward, split_labels, to_device
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import linear_weight
from slimline.quantize.packing import effective_group, expand_groups, quantize_groups
from slimline.quantize.qlinear import QuantLinear
from slimline.quantize.rtn import RtnConfig

# Teacher targets are kept per batch up to this many bytes, else recomputed every step.
TEACHER_CACHE_BYTES = 256 * 2**20
# Mixed-precision fields ``rtn``-family configs may gain; they choose bits, QAT trains them.
_FIXED_BIT_FIELDS = ("average_bits", "bit_choices")


@dataclass(frozen=True, kw_only=True)
class QatConfig(RtnConfig):
    """QAT: ``rtn``'s grid and packing, weights and step sizes trained through the rounding."""

    method: ClassVar[str] = "qat"
    needs_calibration: ClassVar[bool] = True  # the calibration batches are the training data
    needs_training: ClassVar[bool] = True
    summary: ClassVar[str] = "quantization-aware training, learned step sizes (LSQ), int2–int8"
    paper: ClassVar[str] = "LSQ, Esser et al., arXiv 1902.08153; LLM-QAT, arXiv 2305.17888"

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
        for name in _FIXED_BIT_FIELDS:
            field = {f.name: f for f in dataclasses.fields(self)}.get(name)
            if field is not None and getattr(self, name) != _default(field):
                self.fail(name, "is for rtn/gptq/hqq; qat trains one bit width, set bits")
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


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


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


def grouped(weight: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) -> (N, G, group); a ragged last group is zero-padded (no gradient flows there)."""
    n, k = weight.shape
    pad = -k % group
    if pad:
        weight = F.pad(weight, (0, pad))
    return weight.view(n, -1, group)


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
    n, k = weight.shape
    if isinstance(low, torch.Tensor):
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)  # (N, G, 1)
    out = LsqQuantize.apply(grouped(weight, group), scales.unsqueeze(-1), low, high, grad_scale)
    return out.view(n, -1)[:, :k].contiguous()  # (N, K), laid out as QuantLinear's weight


def lsq_codes(
    weight: torch.Tensor, scales: torch.Tensor, low: Any, high: Any, group: int
) -> torch.Tensor:
    """The (N, K) integer codes ``round(clamp(w / s, low, high))`` of :func:`fake_quantize`
    (float tensor holding integers; signed, relative to the zero point)."""
    n, k = weight.shape
    if isinstance(low, torch.Tensor):
        low, high = low.unsqueeze(-1), high.unsqueeze(-1)  # (N, G, 1)
    ratio = grouped(weight.detach(), group) / scales.detach().unsqueeze(-1)
    return torch.round(torch.clamp(ratio, low, high)).view(n, -1)[:, :k]


# --- the train-time layer --------------------------------------------------------------------


class FakeQuantLinear(nn.Module):
    """A Linear-like layer during QAT: LSQ fake-quantized weight, learned step sizes.

    Train-time only, never saved: :meth:`to_quant_linear` gives the packed layer. With
    ``quantize`` False it computes with the original weight and bias (the teacher).
    """

    def __init__(self, module: nn.Module, cfg: QatConfig) -> None:
        super().__init__()
        weight = linear_weight(module).detach()  # (N, K), Conv1D transposed
        bias = getattr(module, "bias", None)
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.symmetric = cfg.bits, cfg.group_size, cfg.symmetric
        self.group = effective_group(self.in_features, cfg.group_size)
        _, scales, zeros = quantize_groups(weight, cfg.bits, cfg.group_size, cfg.symmetric)
        self.scale_dtype = scales.dtype  # rtn's storage choice: the forward rounds to it
        self.scale_floor = torch.finfo(scales.dtype).tiny  # step sizes stay positive, normal
        q_p = 2 ** (cfg.bits - 1) - 1 if cfg.symmetric else 2**cfg.bits - 1
        self.grad_scale = lsq_grad_scale(self.group, q_p)
        # float32 master weights, contiguous (Conv1D's are transposed) so that F.linear runs
        # the kernel QuantLinear will; shared with the original when frozen and already so.
        master = weight.float().contiguous()
        if cfg.trains_weights and master.data_ptr() == weight.data_ptr():
            master = master.clone()
        self.weight = nn.Parameter(master, requires_grad=cfg.trains_weights)
        self.scales = nn.Parameter(scales.float())  # (N, G), exactly rtn's stored values
        self.bias: nn.Parameter | None = None
        if isinstance(bias, torch.Tensor):
            self.bias = nn.Parameter(bias.detach().float().clone(),
                                     requires_grad=cfg.trains_weights)  # fmt: skip
        self.zeros: torch.Tensor | None
        self.register_buffer("zeros", zeros, persistent=False)  # (N, G) uint8 or None
        # The teacher: the original tensors, not registered (not trained, not reduced).
        self.original = (weight, bias.detach() if isinstance(bias, torch.Tensor) else None)
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
        )  # fmt: skip


# --- losses ----------------------------------------------------------------------------------


def _signal(output: Any, batch: Batch) -> tuple[torch.Tensor, bool]:
    """The model's answer as float32 and whether it is logits (KL) or features (MSE)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits.float(), True
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden.float(), False
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]
    if isinstance(output, torch.Tensor):
        return output.float(), False
    raise TypeError(f"qat: cannot find an output tensor in a {type(output).__name__}")


def _token_mask(batch: Batch, shape: torch.Size) -> torch.Tensor | None:
    """The attention mask (B, T) when the answer is per token (B, T, C), else None."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and len(shape) == 3 and mask.shape == shape[:2]:
        return mask.to(torch.float32)
    return None


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, is_logits: bool, mask: torch.Tensor | None
) -> torch.Tensor:
    """KL(teacher ‖ student) per position for logits (``teacher`` as log-probabilities), else
    squared error relative to the teacher's energy; averaged over the positions ``mask``
    (B, T) keeps (all when None). Shapes (..., C)."""
    if is_logits:
        per_row = (teacher.exp() * (teacher - student.log_softmax(-1))).sum(-1)  # (...)
        norm = None
    else:
        per_row = (student - teacher).pow(2).sum(-1)
        norm = teacher.pow(2).sum(-1)
    if mask is None:
        mask = torch.ones_like(per_row)
    loss = (per_row * mask).sum() / mask.sum().clamp_min(1.0)
    if norm is not None:
        loss = loss / ((norm * mask).sum() / mask.sum().clamp_min(1.0)).clamp_min(1e-12)
    return loss


def task_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss on a batch with ``labels``.

    Models whose ``forward`` takes ``labels`` (Hugging Face task heads, which shift the
    labels of causal LMs themselves) give ``output.loss``; otherwise the cross-entropy of
    the logits with the labels (ignoring -100).
    """
    inputs, labels = split_labels(batch)
    if labels is None or not isinstance(batch, Mapping):
        raise ValueError("qat.loss: 'task' needs dict batches with 'labels'")
    if "labels" in inspect.signature(model.forward).parameters:
        loss = getattr(model(**batch), "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
    logits, is_logits = _signal(forward(model, inputs), inputs)
    if not is_logits and logits.shape[:-1] != labels.shape:
        raise ValueError("qat.loss: 'task' needs a model whose output are logits for 'labels'")
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100)


class _Teacher:
    """The original model's targets per batch: the model with fake quantization off."""

    def __init__(self, model: nn.Module, layers: Sequence[FakeQuantLinear]) -> None:
        self.model, self.layers = model, layers
        self.cache: dict[int, tuple[torch.Tensor, bool]] = {}
        self.cached_bytes = 0

    @torch.no_grad()
    def target(self, index: int, batch: Batch) -> tuple[torch.Tensor, bool]:
        if index in self.cache:
            return self.cache[index]
        for layer in self.layers:
            layer.quantize = False
        try:
            answer, is_logits = _signal(forward(self.model, batch), batch)
        finally:
            for layer in self.layers:
                layer.quantize = True
        if is_logits:
            answer = answer.log_softmax(-1)
        size = answer.numel() * answer.element_size()
        if self.cached_bytes + size <= TEACHER_CACHE_BYTES:
            self.cache[index] = (answer, is_logits)
            self.cached_bytes += size
        return answer, is_logits


# --- training --------------------------------------------------------------------------------


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Average ``params``' gradients over the ranks: one ``all_reduce`` of a flat vector."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world == 1 or not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        assert p.grad is not None
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def batch_order(n_batches: int, length: int, seed: int) -> list[int]:
    """``length`` batch indices: seeded permutations of ``range(n_batches)``, one per epoch."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < length:
        order.extend(torch.randperm(n_batches, generator=g).tolist())
    return order[:length]


def train_qat(
    model: nn.Module,
    layers: Sequence[FakeQuantLinear],
    batches: Sequence[Batch],
    cfg: QatConfig,
    *,
    progress: bool = False,
) -> list[float]:
    """Train ``layers``' weights and step sizes inside ``model``; returns the step losses."""
    rank, world = _world()
    weights = [p for m in layers for p in (m.weight, m.bias) if p is not None and p.requires_grad]
    scales = [m.scales for m in layers]
    trained = weights + scales
    if world > 1:
        for p in trained:
            dist.broadcast(p.data, src=0)
    groups = [{"params": scales, "lr": cfg.scale_lr}]
    if weights:
        groups.append({"params": weights, "lr": cfg.lr})
    optimizer = torch.optim.Adam(groups, fused=True)
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / cfg.steps))
    )
    teacher = _Teacher(model, layers)
    order = batch_order(len(batches), cfg.steps * world, cfg.seed)
    losses = []
    for step in tqdm(range(cfg.steps), desc="qat", disable=not progress, leave=False):
        index = order[step * world + rank]
        batch = batches[index]
        if cfg.loss == "task":
            loss = task_loss(model, batch)
        else:
            target, is_logits = teacher.target(index, batch)
            answer, _ = _signal(forward(model, batch), batch)
            loss = distill_loss(answer, target, is_logits, _token_mask(batch, answer.shape))
        if not torch.isfinite(loss):
            raise ValueError(f"qat: the loss became {loss.item()} at step {step}; "
                             "lower lr / scale_lr")  # fmt: skip
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        average_gradients(trained, world)
        optimizer.step()
        cosine.step()
        losses.append(float(loss.detach()))
    return losses


@register(QatConfig)
def apply_qat(model: nn.Module, cfg: QatConfig, ctx: StepContext) -> StepOutcome:
    """Insert fake quantization, train, and convert each selected layer to a QuantLinear."""
    if not ctx.calibration:
        raise ValueError("qat needs calibration data: the batches it trains on")
    if cfg.loss == "task":
        for i, batch in enumerate(ctx.calibration):
            if not isinstance(batch, Mapping) or "labels" not in batch:
                raise ValueError(f"qat.loss: 'task' needs dict batches with 'labels' "
                                 f"(calibration[{i}] has none)")  # fmt: skip
    chosen = cfg.select_modules(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [to_device(b, device) for b in ctx.calibration]
    fake = {name: FakeQuantLinear(module, cfg) for name, module in chosen}
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
