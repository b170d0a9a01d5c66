"""``onednn``: float Linear layers computed by oneDNN's matmul on the CPU, bf16 weights
reordered once into the layout it reads fastest.

At the few rows of a decode step (batch 1: one row; a speculative verify forward: a few) a
Linear layer streams its weight once per call, so its speed is the rate at which the matmul
library reads weights (Pope et al., arXiv 2211.05102: decode is memory-bound). torch's
float32 ``nn.Linear`` on the CPU calls MKL's sgemm; bfloat16 calls oneDNN on the weight as
stored, (out, in) row-major. Measured on an AMD EPYC (Zen 4, AVX-512 BF16, 2 threads), 22
layers of 5632 × 2048 in turn (so the weights come from memory, not cache): float32 1 row
15-17 GB/s through MKL and 25-34 GB/s through oneDNN's matmul on the same tensor, 4 rows
6.6 → 17 GB/s; bfloat16 1 row 12-17 GB/s as stored and 22-28 GB/s after oneDNN's reorder
(``benchmarks/decode.py`` has the whole-model rows). So this step:

* float32 layers: oneDNN's matmul on the weight tensor itself (no copy: the reorder
  measured no faster for float32);
* bfloat16 layers: the weight reordered once for oneDNN (a second copy of the weight, the
  step's note says how many bytes) and that copy used while the weight is unchanged;
* other dtypes (float16 needs AVX512-FP16 for oneDNN) are left as they are, with a note.

The layers stay ``nn.Linear`` (or GPT-2's ``Conv1D``) with their parameters and state_dict
keys: only each layer's ``forward`` is replaced on the instance, so a checkpoint is the plain
model's and ``sl.load`` applies the step again. The oneDNN path runs where it can be exact
and cheap: an input on the CPU of the weight's dtype, no gradient to record, outside
``torch.compile`` tracing (inductor lowers the layer itself; its ``freezing`` does the same
reorder for a traced graph). Every other call is the layer's own forward.

The two operators are torch's own, the ones inductor emits for CPU Linear layers
(``torch.ops.mkldnn._linear_pointwise``, ``torch.ops.mkldnn._reorder_linear_weight``): not
public API, so the step checks that they exist and that they reproduce ``F.linear`` on a
random input before it changes anything, and refuses with the reason otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import is_linear_like, linear_weight, select

# dtypes this step computes in; the value: whether the weight is reordered for oneDNN.
REORDERED = {torch.float32: False, torch.bfloat16: True}
# How far the oneDNN result may be from F.linear's on the parity check, relative to the
# output's largest magnitude: float32 sums in another order (~1e-6 seen); bfloat16 rounds
# the output to 8 bits of mantissa (one ulp is 2^-8 of it).
PARITY_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


@dataclass(frozen=True, kw_only=True)
class OneDNNConfig(MethodConfig):
    """Run float32 / bfloat16 Linear layers on oneDNN's matmul (CPU, inference)."""

    method: ClassVar[str] = "onednn"
    family: ClassVar[Family] = Family.LAYOUT
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    summary: ClassVar[str] = ("float32/bf16 Linear layers on oneDNN's matmul, bf16 weights "
                              "reordered for it: faster few-row (decode) matmuls on the CPU")
    paper: ClassVar[str] = "Pope et al., arXiv 2211.05102 (decode is memory-bound); oneDNN"
    reapply_on_load: ClassVar[bool] = True  # a layer's forward and its reordered copy

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Linear-like layers (targets as for every step) whose weight is on the CPU;
        ValueError (naming the step) when the operators are missing or a layer is elsewhere."""
        name = step or self.method
        chosen = select(model, self.targets, accepts=is_linear_like, step=name)
        for layer_name, layer in chosen:
            device = linear_weight(layer).device
            if device.type != "cpu":
                raise ValueError(f"{name}: {layer_name} is on {device}; oneDNN's matmul here "
                                 "is the CPU's")
        reason = why_unavailable()
        if reason is not None:
            raise ValueError(f"{name}: {reason}")
        return chosen


def why_unavailable() -> str | None:
    """Why this torch cannot run the step (None when it can): no oneDNN, or no operator."""
    if not torch.backends.mkldnn.is_available():
        return f"torch {torch.__version__} is built without oneDNN (mkldnn)"
    for op in ("_linear_pointwise", "_reorder_linear_weight"):
        try:
            getattr(torch.ops.mkldnn, op)
        except (AttributeError, RuntimeError):
            return (f"torch {torch.__version__} has no torch.ops.mkldnn.{op} (the operator "
                    "inductor emits for CPU Linear layers; this step was built on torch 2.13)")
    return None


def reorder(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) copied into oneDNN's layout for this CPU (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` by oneDNN: ``weight`` (out, in), dense or :func:`reorder`'s."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def linear_flops(x_shape: Any, second: Any, *rest: Any, **__: Any) -> int:
    """FLOPs of :func:`onednn_linear` as ``FlopCounterMode`` counts ``F.linear``: x (..., K)
    by weight (N, K), one multiply and one add per term (the bias not counted). The
    operator's ``binary`` overload (x, other, weight, ...) takes the weight third."""
    weight_shape = second if len(second) == 2 and second[1] == x_shape[-1] else rest[0]
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * weight_shape[0]


def _count_flops() -> None:
    """Teach ``FlopCounterMode`` (``sl.evaluate``'s FLOPs) the operator, unless torch knows it."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    if why_unavailable() is None:
        op = torch.ops.mkldnn._linear_pointwise
        if op.default not in flop_registry:
            register_flop_formula(op)(linear_flops)


_count_flops()


def parity_error(dtype: torch.dtype, out_features: int = 64, in_features: int = 96) -> float:
    """Largest |oneDNN − F.linear| over the largest |F.linear| on a random layer of ``dtype``
    (both paths this step uses for it: reordered or not, with a bias)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(3, 5, in_features, generator=g).to(dtype)
    ours = onednn_linear(x, reorder(weight) if REORDERED[dtype] else weight, bias)
    reference = F.linear(x, weight, bias)
    return float((ours.float() - reference.float()).abs().max() / reference.float().abs().max())


class OneDNNForward:
    """A layer's replacement ``forward``: oneDNN where :func:`usable`, else the layer's own.

    Holds its layer, so ``copy.deepcopy`` of the model points the copy's at the copy; the
    reordered weight is not copied (oneDNN's tensors cannot be) but made again on first use.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.calls = 0  # calls it ran through oneDNN (tests read it)
        self._reordered: tuple[tuple[int, int], torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reordered"] = None
        return state

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = linear_weight(self.layer)
        bias: torch.Tensor | None = self.layer.bias  # type: ignore[assignment]
        if not usable(x, weight, bias):
            return type(self.layer).forward(self.layer, x)
        self.calls += 1
        return onednn_linear(x, self.weight_for_onednn(weight), bias)

    def weight_for_onednn(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as oneDNN takes it: the tensor itself (float32) or its reordered copy
        (bfloat16), made again when the weight changed (a new tensor, or written in place)."""
        if not REORDERED[weight.dtype]:
            return weight
        key = (weight.data_ptr(), weight._version)
        if self._reordered is None or self._reordered[0] != key:
            self._reordered = (key, reorder(weight))
        return self._reordered[1]

    def reordered_bytes(self) -> int:
        weight = linear_weight(self.layer)
        return weight.numel() * weight.element_size() if REORDERED[weight.dtype] else 0


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN computes this call: CPU, the weight's dtype throughout, nothing for
    autograd to record, not inside ``torch.compile`` tracing."""
    if torch.compiler.is_compiling() or weight.dtype not in REORDERED:
        return False
    if x.device.type != "cpu" or x.dtype != weight.dtype or weight.device.type != "cpu":
        return False
    if bias is not None and bias.dtype != weight.dtype:
        return False
    tracked = weight.requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
    return not (tracked and torch.is_grad_enabled())


@register(OneDNNConfig)
def apply_onednn(model: nn.Module, cfg: OneDNNConfig, ctx: StepContext) -> StepOutcome:
    """Give each selected float32 / bf16 layer the oneDNN forward (idempotent: ``sl.load``
    runs it again); bf16 weights are reordered now, so the first call does not pay it."""
    chosen = cfg.select_modules(model)
    dtypes = {linear_weight(m).dtype for _, m in chosen} & set(REORDERED)
    for dtype in sorted(dtypes, key=str):
        error = parity_error(dtype)
        if error > PARITY_TOLERANCE[dtype]:
            raise ValueError(f"onednn: torch {torch.__version__}'s oneDNN matmul is "
                             f"{error:.1e} (relative) from F.linear in {dtype}, above "
                             f"{PARITY_TOLERANCE[dtype]:.0e}; not applied")
    done: list[str] = []
    skipped: dict[str, list[str]] = {}
    extra = 0
    with torch.no_grad():
        for name, layer in chosen:
            dtype = linear_weight(layer).dtype
            if dtype not in REORDERED:
                skipped.setdefault(str(dtype).removeprefix("torch."), []).append(name)
                continue
            current = vars(layer).get("forward")
            forward = current if isinstance(current, OneDNNForward) else OneDNNForward(layer)
            layer.forward = forward  # type: ignore[method-assign]
            forward.weight_for_onednn(linear_weight(layer))
            extra += forward.reordered_bytes()
            done.append(name)
    notes = [f"{len(done)} layer(s) on oneDNN's matmul"]
    if extra:
        notes.append(f"bf16 weights reordered for oneDNN: {extra / 2**20:.1f} MiB more memory "
                     "(the stored weights are unchanged)")
    notes += [f"left as they are ({dtype}: oneDNN here takes float32 and bf16): "
              f"{len(names)} layer(s), e.g. {names[0]}" for dtype, names in skipped.items()]
    return StepOutcome(modules=done, notes=notes)
