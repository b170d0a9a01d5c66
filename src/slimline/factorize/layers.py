"""The factorized layers: plain ``nn.Linear`` / ``nn.Conv2d`` children in a small container.

A factorized layer is a sequence of ordinary layers, so every later step sees ordinary
layers: ``rtn``/``gptq`` quantize ``.first`` and ``.second`` like any Linear, pruners mask
them, ``lora`` adapts them. Both containers describe themselves with JSON for ``sl.load``
(``core/modules.py``); their tensors are their children's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimline.core.modules import is_registered_module, module_type, register_module

META_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d
           for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: object) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}")
    return _DTYPES[name]


def _positive(meta: dict[str, Any], key: str) -> int:
    value = meta[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return value


def _pair(meta: dict[str, Any], key: str, least: int) -> tuple[int, int]:
    value = meta[key]
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and v >= least for v in value)):
        raise ValueError(f"{key} must be two integers ≥ {least}, got {value!r}")
    return value[0], value[1]


def _check_version(meta: dict[str, Any]) -> None:
    if meta.get("version") != META_VERSION:
        raise ValueError(f"version {meta.get('version')!r} is not {META_VERSION}")


def _bias_flag(meta: dict[str, Any]) -> bool:
    if not isinstance(meta["bias"], bool):
        raise ValueError(f"bias must be true or false, got {meta['bias']!r}")
    return meta["bias"]


def children_meta(module: nn.Module, names: tuple[str, ...]) -> dict[str, Any]:
    """Per child: its dtype when it is still a plain layer, else the registered compressed
    module's own type and metadata (a factor quantized by ``rtn``), so the container
    rebuilds all it holds (the checkpoint records only outermost compressed modules)."""
    out: dict[str, Any] = {}
    for name in names:
        child = module.get_submodule(name)
        if isinstance(child, (nn.Linear, nn.Conv2d)) and type(child) in (nn.Linear, nn.Conv2d):
            out[name] = {"dtype": dtype_name(child.weight.dtype)}
        elif is_registered_module(child):
            out[name] = {"type": type(child).__name__,
                         "meta": child.slimline_meta()}  # type: ignore[operator]
        else:
            raise TypeError(f"{type(module).__name__}.{name} is a {type(child).__name__}, "
                            "which a checkpoint cannot rebuild")
    return out


def _rebuild_children(module: nn.Module, meta: dict[str, Any], names: tuple[str, ...]) -> None:
    """Put back what :func:`children_meta` recorded: dtypes, compressed children."""
    children = meta["children"]
    if not isinstance(children, dict) or set(children) != set(names):
        raise ValueError(f"children must describe {', '.join(names)}")
    for name in names:
        entry = children[name]
        if not isinstance(entry, dict):
            raise ValueError(f"children[{name!r}] must be an object")
        if "type" in entry:
            built = module_type(entry["type"]).from_slimline_meta(entry["meta"])  # type: ignore[attr-defined]
            module.set_submodule(name, built)
        else:
            module.get_submodule(name).to(parse_dtype(entry["dtype"]))


@register_module
class LowRankLinear(nn.Module):
    """``y = second(first(x))``: W (N, K) ≈ B (N, r) · A (r, K), the bias on ``second``.

    Stores r·(N + K) weights instead of N·K: fewer for every r < N·K / (N + K).
    """

    CHILDREN = ("first", "second")

    def __init__(
        self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype)  # A (r, K)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype)  # B (N, r)

    @classmethod
    def from_factors(
        cls, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> LowRankLinear:
        """The layer computing ``x Aᵀ Bᵀ + bias``, A = ``first`` (r, K), B = ``second`` (N, r)."""
        rank, k = first.shape
        layer = cls(k, second.shape[0], rank, bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            layer.first.weight.copy_(first)
            layer.second.weight.copy_(second)
            if bias is not None and layer.second.bias is not None:
                layer.second.bias.copy_(bias)
        return layer.to(first.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))  # (..., K) → (..., r) → (..., N)

    def slimline_meta(self) -> dict[str, Any]:
        return {"version": META_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank,
                "bias": getattr(self.second, "bias", None) is not None,
                "children": children_meta(self, self.CHILDREN)}

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> LowRankLinear:
        _check_version(meta)
        layer = cls(_positive(meta, "in_features"), _positive(meta, "out_features"),
                    _positive(meta, "rank"), bias=_bias_flag(meta))
        _rebuild_children(layer, meta, cls.CHILDREN)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@register_module
class TuckerConv2d(nn.Module):
    """Tucker-2 convolution: 1×1 (C_in → r_in), k×k core (r_in → r_out), 1×1 (r_out → C_out).

    Kim et al., arXiv 1511.06530: the kernel W (C_out, C_in, kh, kw) ≈ core ×₀ U_out ×₁ U_in;
    the stride, padding and dilation are the core's, the bias the last layer's.
    """

    CHILDREN = ("first", "core", "last")

    def __init__(
        self, in_channels: int, out_channels: int, ranks: tuple[int, int],
        kernel_size: tuple[int, int], *, stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
        bias: bool = True, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        r_in, r_out = ranks
        self.in_channels, self.out_channels, self.ranks = in_channels, out_channels, (r_in, r_out)
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False, dtype=dtype)
        self.core = nn.Conv2d(r_in, r_out, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=False, dtype=dtype)
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))  # (B, C_in, H, W) → (B, C_out, H', W')

    def slimline_meta(self) -> dict[str, Any]:
        core = self.core
        return {"version": META_VERSION, "in_channels": self.in_channels,
                "out_channels": self.out_channels, "ranks": list(self.ranks),
                "kernel_size": list(core.kernel_size), "stride": list(core.stride),
                "padding": list(core.padding), "dilation": list(core.dilation),
                "bias": getattr(self.last, "bias", None) is not None,
                "children": children_meta(self, self.CHILDREN)}

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> TuckerConv2d:
        _check_version(meta)
        layer = cls(
            _positive(meta, "in_channels"), _positive(meta, "out_channels"),
            _pair(meta, "ranks", 1), _pair(meta, "kernel_size", 1),
            stride=_pair(meta, "stride", 1), padding=_pair(meta, "padding", 0),
            dilation=_pair(meta, "dilation", 1), bias=_bias_flag(meta),
        )
        _rebuild_children(layer, meta, cls.CHILDREN)
        return layer
