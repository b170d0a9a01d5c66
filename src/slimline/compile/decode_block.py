"""A Llama block's one-token decode step as one C call (``fast_decode``, packed layers);
Qwen3's per-head q/k RMSNorms included.

Through :func:`slimline.compile.fast_decode.decode_step` a block is ~20 Python-level calls —
seven packed projections (each a module call and a kernel call), norms, rotary, the cache
append, attention, residuals, SwiGLU — and on ``llama-1b-random`` (rtn int4 g128, int8
activations, 2 threads on the 2-core AMD EPYC here) they added ~17 ms to a ~70 ms token
beyond the kernels' own time. When all seven projections of a block run slimline's gemv
kernels (``QuantLinear`` with a prepared decode call, no hooks) on float32 activations,
``csrc/decode_block.c`` runs the whole block in one call: the same kernels, the norms and
rotary of ``decode_ops``, the new key and value written into the room kept behind the cache
layer (:func:`slimline.compile.kv_room.append_in_place`'s), attention in float32 and the
SwiGLU MLP. Any other block — float or cast projections, hooks, a quantized KV cache, a
FLOP counter watching — runs the Python step.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimline.compile import decode_ops
from slimline.quantize import kernels_gemv
from slimline.quantize.qlinear import QuantLinear

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
HEAD_NORMS = ("q_norm", "k_norm")  # Qwen3's RMSNorms over each query / key head
_SIZE, _POINTER, _REAL = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double


class _Linear(ctypes.Structure):
    """``struct slimline_linear`` (decode_block.c): every field 8 bytes."""

    _fields_ = [("qweight", _POINTER), ("scales", _POINTER), ("zeros", _POINTER),
                ("bias", _POINTER), ("in_features", _SIZE), ("out_features", _SIZE),
                ("bits", _SIZE), ("group", _SIZE), ("scale_kind", _SIZE),
                ("int8_activations", _SIZE)]  # fmt: skip


class _Block(ctypes.Structure):
    """``struct slimline_block`` (decode_block.c)."""

    _fields_ = [*((name, _Linear) for name in PROJECTIONS), ("attn_norm", _POINTER),
                ("mlp_norm", _POINTER), ("attn_eps", _REAL), ("mlp_eps", _REAL),
                ("scaling", _REAL), ("hidden", _SIZE), ("heads", _SIZE), ("kv_heads", _SIZE),
                ("head_dim", _SIZE), ("intermediate", _SIZE), ("q_norm", _POINTER),
                ("k_norm", _POINTER), ("q_eps", _REAL), ("k_eps", _REAL)]  # fmt: skip


def _child(module: Any, name: str) -> Any:
    """``module.name`` for a submodule, read from ``_modules`` (``Module.__getattr__`` is slow,
    and this runs for every block and decode token)."""
    children = getattr(module, "_modules", None)
    return children[name] if children is not None and name in children else getattr(module, name)


def projections(block: Any) -> tuple[nn.Module, ...]:
    """The block's seven projections, in :data:`PROJECTIONS`' order."""
    attn, mlp = _child(block, "self_attn"), _child(block, "mlp")
    return (*(_child(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(_child(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")))


def _silu(module: Any) -> bool:
    """Whether ``module`` is SiLU (torch's, or transformers' ``SiLUActivation``)."""
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def _call(module: nn.Module, probe: torch.Tensor) -> kernels_gemv.GemvCall | None:
    """The packed layer's prepared one-row float32 call, or None (not packed, hooked, or no
    gemv kernel for it)."""
    if type(module) is not QuantLinear or module._forward_hooks or module._forward_pre_hooks:
        return None
    return module._decode_call(probe)


def _norm_weight(norm: Any, width: int) -> torch.Tensor | None:
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None)
    if not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        return None
    if weight.shape != (width,) or not decode_ops.reads(weight):
        return None
    return weight


@dataclass
class NativeBlock:
    """A block's C step: the ctypes struct and what it points into (kept alive, and compared
    with the block's current layers before each step)."""

    block: Any
    calls: tuple[kernels_gemv.GemvCall, ...]
    norms: tuple[torch.Tensor, torch.Tensor]
    struct: _Block
    head_norms: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # Qwen3 q/k

    def current(self, parts: tuple[nn.Module, ...]) -> bool:
        """Whether the block still has the norms, and ``parts`` (its :func:`projections`) the
        prepared calls, this struct was made from (hooks are the caller's to check)."""
        block = self.block
        for name, norm in zip(("input_layernorm", "post_attention_layernorm"), self.norms,
                              strict=True):  # fmt: skip
            module = _child(block, name)
            weight = getattr(module, "_parameters", {}).get("weight")
            if (weight if weight is not None else getattr(module, "weight", None)) is not norm:
                return False
        attn = _child(block, "self_attn")
        for name, head_norm in zip(HEAD_NORMS, self.head_norms, strict=True):
            module = getattr(attn, "_modules", {}).get(name)
            weight = None if module is None else module._parameters.get("weight")
            if weight is not head_norm:
                return False
        return all(type(module) is QuantLinear and module.prepared_call(torch.float32) is call
                   for module, call in zip(parts, self.calls, strict=True))

    def takes(self, layer: Any) -> bool:
        """Whether the cache layer's keys and values are ones the C step appends to: float32
        on the CPU, (1, KV, length, D) of this block's heads."""
        shape = (1, self.struct.kv_heads, layer.keys.shape[-2], self.struct.head_dim)
        return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == shape
                   for t in (layer.keys, layer.values))  # fmt: skip

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: int,
             cos: torch.Tensor, sin: torch.Tensor) -> None:
        """One decode step: ``x`` (1, hidden) updated in place, the new key and value written
        at ``position`` of ``keys`` / ``values`` (1, KV, room, D), room > position."""
        status = decode_ops.library().slimline_decode_block(
            ctypes.addressof(self.struct), x.data_ptr(), keys.data_ptr(), values.data_ptr(),
            position, keys.shape[-2], cos.data_ptr(), sin.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError("fast_decode: the C block step refused its arguments")


def native_block(block: Any, config: Any) -> NativeBlock | None:
    """The block's C step, or None where the Python step runs it: a projection that is not a
    packed layer on the gemv kernels (or is hooked), norms that are not float32 RMSNorms of
    the hidden width, an activation other than SiLU, or no C library here."""
    if not decode_ops.available() or getattr(config, "hidden_act", None) != "silu":
        return None
    attn, mlp = block.self_attn, block.mlp
    if not _silu(mlp.act_fn):
        return None
    modules = projections(block)
    widths = [getattr(module, "in_features", 0) for module in modules]
    probes = tuple(torch.empty(1, width) for width in widths)
    calls = [_call(module, probe) for module, probe in zip(modules, probes, strict=True)]
    fields: list[Any] = [None if call is None else call.native_fields() for call in calls]
    hidden = widths[0]
    norms = (_norm_weight(block.input_layernorm, hidden),
             _norm_weight(block.post_attention_layernorm, hidden))  # fmt: skip
    if any(f is None for f in fields) or norms[0] is None or norms[1] is None:
        return None
    dim = int(attn.head_dim)
    modules_qk = [getattr(attn, n, None) for n in HEAD_NORMS]  # Qwen3's, else None
    head_norms = [None if m is None else _norm_weight(m, dim) for m in modules_qk]
    if any(m is not None and w is None for m, w in zip(modules_qk, head_norms, strict=True)):
        return None  # a q/k norm the C step cannot read
    q, k, v, o, gate, up, down = (call.n for call in calls)  # type: ignore[union-attr]
    heads, kv_heads = q // dim, k // dim
    shapes_ok = (q == heads * dim and k == v == kv_heads * dim and kv_heads > 0
                 and heads % kv_heads == 0 and widths[3] == heads * dim and o == hidden
                 and widths[4] == widths[5] == hidden and gate == up == widths[6]
                 and down == hidden)  # fmt: skip
    if not shapes_ok:
        return None
    struct = _Block(
        *(_Linear(*f) for f in fields),
        norms[0].data_ptr(), norms[1].data_ptr(),
        float(block.input_layernorm.variance_epsilon),
        float(block.post_attention_layernorm.variance_epsilon),
        float(attn.scaling), hidden, heads, kv_heads, dim, widths[6],
        *(None if w is None else w.data_ptr() for w in head_norms),
        *(0.0 if m is None else float(m.variance_epsilon) for m in modules_qk),
    )  # fmt: skip
    return NativeBlock(block, tuple(calls), (norms[0], norms[1]), struct,  # type: ignore[arg-type]
                       (head_norms[0], head_norms[1]))
