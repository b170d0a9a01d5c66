"""The LoRA / DoRA layer: a frozen base layer plus a trainable low-rank update.

LoRA (Hu et al., arXiv 2106.09685) adds ``ΔW = s · B A`` to a frozen weight ``W`` (N, K), with
``A`` (r, K), ``B`` (N, r), ``B`` initialised to zero so training starts at the base model, and
``s = α / r`` (rsLoRA, arXiv 2312.03732: ``α / √r``, which keeps the update's scale stable
as ``r`` grows). DoRA (Liu et al., arXiv 2402.09353) splits the weight into a magnitude and
a direction: ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row`` with a learned magnitude vector ``m`` (N,)
initialised to ``‖W‖_row``; the norm is detached from the gradient graph (§4.3), which
saves memory at no loss of accuracy.

The base layer may be an ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored transposed) or
slimline's packed :class:`~slimline.quantize.qlinear.QuantLinear` (QLoRA, arXiv 2305.14314:
the base stays packed and frozen, the adapters are float32). Attribute names follow the
``peft`` package (``base_layer``, ``lora_A``, ``lora_B``, ``lora_magnitude_vector``), so
the state-dict keys map one to one onto its adapter files.

Over a pruned base an optional ``weight_mask`` M (N, K) keeps the pruning: the layer computes
with ``(W + ΔW) ⊙ M``, which is ``W + ΔW ⊙ M`` as W is already zero off M, so the weight
merging writes has exactly the base's zeros and computes what was trained (a dense ΔW
merged and then re-pruned would not). The masked update is formed as a dense (N, K) matrix,
one extra matmul of the layer's size per forward.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimline.core.modules import module_type, register_module
from slimline.core.targets import is_conv1d, is_linear_like, linear_weight
from slimline.quantize.qlinear import QuantLinear

META_VERSION = 1
# Adapters train and are stored in float32 whatever the base's dtype (as peft's default
# ``autocast_adapter_dtype``): bf16 adapter updates of ~lr·|w| are lost to rounding.
ADAPTER_DTYPE = torch.float32


# --- maths --------------------------------------------------------------------------------------


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """``α / r`` (LoRA, arXiv 2106.09685 §4.1), or ``α / √r`` with rsLoRA (arXiv 2312.03732)."""
    if r < 1:
        raise ValueError(f"lora rank must be ≥ 1, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The (N, K) update ``s · B A`` from ``A`` (r, K) and ``B`` (N, r)."""
    return scaling * (lora_b @ lora_a)


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(N,) L2 norm of each output row of ``W + ΔW`` (DoRA's ``‖V + ΔV‖_c``, arXiv 2402.09353)."""
    return torch.linalg.vector_norm(weight + delta, dim=1)


def merged_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor | None
) -> torch.Tensor:
    """The (N, K) weight the adapted layer computes with: ``W + ΔW`` (LoRA), or with DoRA
    each row rescaled to its learned magnitude, ``m ⊙ (W + ΔW) / ‖W + ΔW‖_row``."""
    combined = weight + delta
    if magnitude is None:
        return combined
    return (magnitude / dora_weight_norm(weight, delta)).unsqueeze(1) * combined


# --- the layer ----------------------------------------------------------------------------------


class LoraFactor(nn.Module):
    """One low-rank factor: ``x Wᵀ`` without bias. Not an ``nn.Linear`` on purpose, so that a
    later step's default targets (all Linear-like layers) never quantize or prune it."""

    def __init__(self, in_features: int, out_features: int, *, device: Any = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=ADAPTER_DTYPE, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


@register_module
class LoraLinear(nn.Module):
    """``y = base(x) + s · B A x`` (LoRA) or the DoRA layer, over a frozen base layer.

    ``base_layer``: ``nn.Linear``, ``Conv1D`` or ``QuantLinear``; ``lora_A`` (r, K) starts
    Kaiming-uniform (as ``nn.Linear``), ``lora_B`` (N, r) at zero, so the layer first computes
    exactly as its base. ``lora_magnitude_vector`` (N,) only with DoRA.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        dora: bool = False,
        rslora: bool = False,
        generator: torch.Generator | None = None,
        weight_mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not (is_linear_like(base_layer) or isinstance(base_layer, QuantLinear)):
            raise TypeError(f"lora: cannot adapt a {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.out_features, self.in_features = base_shape(base_layer)
        self.weight_mask: torch.Tensor | None
        if weight_mask is not None:
            if tuple(weight_mask.shape) != (self.out_features, self.in_features):
                raise ValueError(f"lora: weight_mask of shape {tuple(weight_mask.shape)} does "
                                 f"not fit the ({self.out_features}, {self.in_features}) "
                                 "weight")  # fmt: skip
            weight_mask = weight_mask.to(device=_base_device(base_layer), dtype=torch.bool)
        # (N, K) bool, 1 where the weight may be non-zero; saved with the layer.
        self.register_buffer("weight_mask", weight_mask)
        self.r, self.alpha, self.rslora, self.dropout_p = r, float(alpha), rslora, dropout
        self.scaling = lora_scaling(r, alpha, rslora)
        device = _base_device(base_layer)
        self.lora_A = LoraFactor(self.in_features, r, device=device)
        self.lora_B = LoraFactor(r, self.out_features, device=device)
        if device != torch.device("meta"):
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        if dora and device == torch.device("meta"):
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features,
                                                                  device=device))  # fmt: skip
        elif dora:
            with torch.no_grad():
                norm = torch.linalg.vector_norm(self.base_weight(ADAPTER_DTYPE), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm)  # (N,): starts at ‖W‖_row

    @property
    def dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base's (N, K) weight (dequantized when packed, Conv1D's transposed)."""
        if isinstance(self.base_layer, QuantLinear):
            return self.base_layer.dequantized_weight(dtype or ADAPTER_DTYPE)
        weight = linear_weight(self.base_layer)
        return weight if dtype is None else weight.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """The (N, K) LoRA update ``s · B A`` (float32), ``⊙ M`` with a weight mask."""
        delta = delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)
        if self.weight_mask is None:
            return delta
        return delta * self.weight_mask

    def adapted_weight(self) -> torch.Tensor:
        """The (N, K) float32 weight this layer computes with (what merging writes)."""
        magnitude = self.lora_magnitude_vector
        return merged_weight(self.base_weight(ADAPTER_DTYPE), self.delta_weight(),
                             None if magnitude is None else magnitude.detach())  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., N)
        dropped = self.dropout(x.to(ADAPTER_DTYPE))
        if self.weight_mask is None:
            lora = self.lora_B(self.lora_A(dropped)) * self.scaling  # (..., N)
        else:  # the masked update is not low-rank: form it
            lora = F.linear(dropped, self.delta_weight())
        if self.lora_magnitude_vector is None:
            return result + lora.to(result.dtype)
        return result + self._dora_extra(result, dropped, lora).to(result.dtype)

    def _dora_extra(
        self, result: torch.Tensor, dropped: torch.Tensor, lora: torch.Tensor
    ) -> torch.Tensor:
        """What DoRA adds to ``base(x)``: ``(m/‖W+ΔW‖ - 1) · W x + m/‖W+ΔW‖ · s B A x``,
        ``W x`` taken from the base's output when no dropout is applied (peft's formula)."""
        magnitude = self.lora_magnitude_vector
        if magnitude is None:
            raise RuntimeError("DoRA forward on a layer without a magnitude vector")
        weight = self.base_weight(ADAPTER_DTYPE)
        norm = dora_weight_norm(weight, self.delta_weight().detach()).detach()  # (N,)
        scale = magnitude / norm
        if isinstance(self.dropout, nn.Identity):
            bias = self.bias
            base = result.to(ADAPTER_DTYPE) - (0 if bias is None else bias.to(ADAPTER_DTYPE))
        else:
            base = F.linear(dropped, weight)
        return (scale - 1) * base + scale * lora

    def extra_repr(self) -> str:
        kind = "dora" if self.dora else "lora"
        masked = ", masked" if self.weight_mask is not None else ""
        return f"{kind}, r={self.r}, alpha={self.alpha:g}, rslora={self.rslora}{masked}"

    # --- checkpoint ---------------------------------------------------------------------------

    def slimline_meta(self) -> dict[str, Any]:
        """JSON that rebuilds this layer empty, its base included (``core/modules.py``)."""
        return {
            "version": META_VERSION, "r": self.r, "alpha": self.alpha, "rslora": self.rslora,
            "dropout": self.dropout_p, "dora": self.dora, "base": _base_meta(self.base_layer),
            "masked": self.weight_mask is not None,
        }  # fmt: skip

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> LoraLinear:
        if meta.get("version") != META_VERSION:
            raise ValueError(f"lora layer metadata version {meta.get('version')!r} unsupported")
        base = _base_from_meta(meta["base"])
        with torch.device("meta"):  # load_state_dict(assign=True) supplies every tensor
            n_out, n_in = base_shape(base)
            mask = torch.empty(n_out, n_in, dtype=torch.bool) if meta.get("masked") else None
            return cls(base, r=int(meta["r"]), alpha=float(meta["alpha"]),
                       dropout=float(meta["dropout"]), dora=bool(meta["dora"]),
                       rslora=bool(meta["rslora"]), weight_mask=mask)  # fmt: skip


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a layer LoRA can adapt."""
    if isinstance(module, QuantLinear):
        return module.out_features, module.in_features
    out_features, in_features = linear_weight(module).shape
    return int(out_features), int(in_features)


def _base_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.buffers()), None) if isinstance(module, QuantLinear) else None
    tensor = tensor if tensor is not None else next(iter(module.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32)}


def _base_meta(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, QuantLinear):
        return {"kind": "quant", "type": type(module).__name__, "meta": module.slimline_meta()}
    weight = linear_weight(module)
    out_features, in_features = weight.shape
    return {
        "kind": "conv1d" if is_conv1d(module) else "linear",
        "in_features": int(in_features), "out_features": int(out_features),
        "bias": getattr(module, "bias", None) is not None,
        "dtype": str(weight.dtype).removeprefix("torch."),
    }  # fmt: skip


def _base_from_meta(meta: dict[str, Any]) -> nn.Module:
    """An empty base layer on the meta device (a packed one through its own metadata)."""
    kind = meta["kind"]
    if kind == "quant":
        with torch.device("meta"):
            return module_type(meta["type"]).from_slimline_meta(meta["meta"])  # type: ignore[attr-defined, no-any-return]
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"unsupported base dtype {meta['dtype']!r}")
    dtype = _DTYPES[meta["dtype"]]
    n_in, n_out, bias = int(meta["in_features"]), int(meta["out_features"]), bool(meta["bias"])
    if kind == "linear":
        return nn.Linear(n_in, n_out, bias=bias, device="meta", dtype=dtype)
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            conv = Conv1D(n_out, n_in).to(dtype)
        if not bias:
            del conv.bias
            conv.register_parameter("bias", None)
        return conv
    raise ValueError(f"unknown lora base kind {kind!r}")
