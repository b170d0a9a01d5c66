"""Quantized drop-in replacements for ``nn.Linear`` (and GPT-2's ``Conv1D``).

* :class:`QuantLinear` — weight-only: b-bit codes packed densely in a uint8 buffer, per-group
  scales (+ zero points), the bias as it was. Used by ``rtn``, ``gptq``, ``hqq``, ``awq``, ``qat``.

The W8A8 layers (:mod:`slimline.quantize.w8a8`) share the buffer and kernel-cache helpers
defined here.

Every tensor needed for inference is a persistent buffer, stored as it is kept in memory, so
``state_dict()`` is the checkpoint and its bytes are the layer's size. Decode-sized calls
(up to :data:`GEMV_MAX_ROWS` rows) run slimline's gemv kernel
(:mod:`slimline.quantize.kernels_gemv`), which reads those buffers as they are: no second
layout, no memory beyond them; larger eager calls (prefill) multiply 4 MiB tiles of the
weight that the same C library dequantizes, never the whole layer in float32.
Kernel-specific layouts of the fallbacks (torch's int4 tile layout, oneDNN's prepacked
weight) are *derived* from the buffers — lazily for the weight-only kernels, which only some
calls use, and eagerly (after construction, ``load_state_dict`` and ``.to()``) for oneDNN,
whose weight every call uses — and never saved: they are not portable across machines or
torch versions.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimline.core.modules import register_module
from slimline.core.targets import linear_weight
from slimline.models.cpu import cpu_bf16_supported
from slimline.quantize import kernels_cuda as cuda
from slimline.quantize import kernels_gemv as gemv
from slimline.quantize import kernels_weight_only as kernels
from slimline.quantize.packing import (
    centre,
    check_bits,
    dequantize,
    effective_group,
    num_groups,
    pack,
    packed_numel,
    quantize_groups,
    unpack,
)

META_VERSION = 1
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32)}
# Up to how many rows (tokens) slimline's gemv kernel (kernels_gemv) runs a call: decode and
# speculative verification. Beyond it an eager CPU call multiplies 4 MiB tiles of the weight,
# dequantized by the same C library, with torch's GEMM (kernels_gemv.tiled_linear).
# BENCHMARKS "quant-kernels" (a 2048x5632 layer, 1 thread, AMX Xeon): the gemv kernel reads
# the codes once per 4 rows, so its time grows with the rows, while the tiles cost a
# dequantization (a few ms) plus F.linear's GEMM (within 1.1x of float32 at 128 rows); they
# cross between 16 and 32 rows for int4 g128 and int8, between 8 and 16 for int4 g32.
GEMV_MAX_ROWS = 16
# Up to how many rows torch's weight-only CPU kernels beat dequantize + F.linear, by
# activation dtype, where slimline's gemv kernel is not used. Measured with 2 threads on a
# 2-core AMD EPYC (Zen 5, AVX-512 VNNI/BF16, no AMX), torch 2.13, layers 1536×384 to
# 4096×1024: in bfloat16, int4 wins to 64 rows and int8 to 32 (e.g. 2048×2048 at 32 rows:
# int4 kernel 1.3 ms, dequantize 3.3 ms); in float32 they win at one row for large layers
# (4096×1024: 4.1 vs 11.3 ms) and lose from 2 rows on, their float32 (and float16) inner loops
# not being vectorised (float16 never wins). On AVX2 without AVX-512 their float32 path is
# 4-8× slower than float32 F.linear (kernels_gemv), so they are a last resort there.
_INT4PACK_MAX_ROWS = {torch.bfloat16: 64, torch.float32: 1}
_INT8PACK_MAX_ROWS = {torch.bfloat16: 32, torch.float32: 1}
# How the gemv kernel takes x: "float" (float32, the dequantized reference's products in
# another order) or "int8" (rounded to int8 in blocks of 32 columns, integer dot products:
# llama.cpp's arithmetic for Q4_0/Q8_0; kernels_gemv.round_activations is its reference).
DECODE_ACTIVATIONS = ("float", "int8")
_WARNED: set[str] = set()  # fallback reasons already reported (once per process)
_NATIVE_BF16: dict[str, bool] = {}  # whether the CPU runs bf16 natively, asked once
_CUDA_OPERATORS: dict[str, bool] = {}  # which weight-only operators have CUDA kernels, asked once
_CAPABILITIES: dict[int, tuple[int, int]] = {}  # compute capability by CUDA device index


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r} in checkpoint metadata") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().clone()


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    if isinstance(module, _KernelCacheMixin):
        module.refresh_kernels()


class LogicalWeightCounts:
    """What the evaluator asks of a packed layer: the values it stands for, and its zeros.

    ``logical_numel`` counts the (N, K) weight and the bias as the float layer had them, so
    parameter counts compare with the original; ``zero_count`` counts exact zeros of the
    weight the layer computes with (pruned weights stay zero on every grid) and of the bias.
    """

    in_features: int
    out_features: int
    bias: torch.Tensor | None

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def logical_numel(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel()
        return self.in_features * self.out_features + bias

    def zero_count(self) -> int:
        bias = 0 if self.bias is None else int((self.bias == 0).sum())
        return int((self.dequantized_weight() == 0).sum()) + bias


class _KernelCacheMixin(nn.Module):
    """Derived kernel layouts kept out of ``state_dict``, deepcopy and pickle."""

    def _init_cache(self) -> None:
        self._derived: dict[str, Any] = {}  # layouts by name (QuantLinear: + "_sources")
        self._calls: dict[tuple[torch.dtype, str], gemv.GemvCall | None] = {}
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def refresh_kernels(self) -> None:
        """Forget derived layouts and prepared kernel calls; called after the buffers change."""
        self._derived = {}
        self._calls = {}

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        out = super()._apply(fn, recurse)
        self.refresh_kernels()
        return out

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state["_derived"] = {}
        state["_calls"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.refresh_kernels()


@register_module
class QuantLinear(LogicalWeightCounts, _KernelCacheMixin):
    """Weight-only round-to-nearest linear: ``y = x · dequant(W)ᵀ + b``.

    Buffers: ``qweight`` (packed codes, ``ceil(N·K·bits/8)`` bytes), ``scales`` (N, G),
    ``zeros`` (N, G) uint8 when asymmetric, ``bias`` (N,) when the original had one.
    ``decode_activations``: how decode-sized calls treat x (:data:`DECODE_ACTIVATIONS`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool = True,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
        decode_activations: str = "float",
    ) -> None:
        super().__init__()
        check_bits(bits)
        if decode_activations not in DECODE_ACTIVATIONS:
            raise ValueError(
                f"decode_activations must be one of {list(DECODE_ACTIVATIONS)}, "
                f"got {decode_activations!r}"
            )
        # "int8": decode-sized calls round x to int8 in blocks of 32 and sum in integers
        # (kernels_gemv, as llama.cpp's Q4_0/Q8_0 do); "float": float32 activations, exact.
        self.decode_activations = decode_activations
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.group = effective_group(in_features, group_size)
        groups = num_groups(in_features, group_size)
        codes = packed_numel(out_features * in_features, bits)
        self.qweight: torch.Tensor
        self.scales: torch.Tensor
        self.zeros: torch.Tensor | None
        self.bias: torch.Tensor | None
        self.register_buffer("qweight", torch.empty(codes, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=scale_dtype))
        zeros = None if symmetric else torch.empty(out_features, groups, dtype=torch.uint8)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype) if bias else None)
        self._init_cache()

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        decode_activations: str = "float",
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` or ``Conv1D`` (RTN) into a new layer."""
        weight = linear_weight(module).detach()  # (N, K)
        q, scales, zeros = quantize_groups(weight, bits, group_size, symmetric)
        layer = cls.from_codes(
            q, scales, zeros, bias=getattr(module, "bias", None), bits=bits,
            group_size=group_size, symmetric=symmetric, decode_activations=decode_activations,
        )  # fmt: skip
        return layer.to(weight.device)

    @classmethod
    def from_codes(
        cls,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        *,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        decode_activations: str = "float",
    ) -> QuantLinear:
        """A layer holding codes as :func:`~slimline.quantize.packing.quantize_groups` gives
        them (signed when symmetric), for quantizers that choose codes their own way (GPTQ)."""
        out_features, in_features = q.shape
        if symmetric != (zeros is None):
            raise ValueError("zero points must be given exactly when the grid is asymmetric")
        if tuple(scales.shape) != (out_features, num_groups(in_features, group_size)):
            raise ValueError(
                f"scales of shape {tuple(scales.shape)} do not fit codes {tuple(q.shape)}"
            )
        bias = None if bias is None else bias.detach().clone()
        layer = cls(
            in_features, out_features, bits=bits, group_size=group_size, symmetric=symmetric,
            bias=bias is not None, scale_dtype=scales.dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            decode_activations=decode_activations,
        )  # fmt: skip
        stored = q.to(torch.int16) + 2 ** (bits - 1) if symmetric else q  # offset binary
        layer.qweight = pack(stored.to(torch.uint8), bits).to(scales.device)
        layer.scales = scales.detach().clone()
        layer.zeros = None if zeros is None else zeros.detach().to(torch.uint8).clone()
        layer.bias = bias
        return layer

    def stored_codes(self) -> torch.Tensor:
        """The (N, K) unsigned codes as stored (offset by ``2^(bits-1)`` when symmetric)."""
        return unpack(self.qweight, self.bits, (self.out_features, self.in_features))

    def codes(self) -> torch.Tensor:
        """The (N, K) codes as ``quantize_groups`` gives them (int8 signed when symmetric)."""
        return self.centred_codes() if self.symmetric else self.stored_codes()

    def centred_codes(self) -> torch.Tensor:
        """(N, K) ``q - z``, signed: int8 up to 7 bits, int16 at 8 (the dequantize hot path)."""
        stored = self.stored_codes()
        if self.bits == 8:
            as_int8 = (stored ^ 0x80).view(torch.int8)  # q - 128, the top bit flipped
            if self.zeros is None:
                return as_int8
            return centre(stored, self.zeros, self.group_size, torch.int16)
        as_int8 = stored.view(torch.int8)  # codes < 128: the same values
        if self.zeros is None:
            return as_int8 - 2 ** (self.bits - 1)
        return centre(as_int8, self.zeros.view(torch.int8), self.group_size, torch.int8)

    def zero_points(self) -> torch.Tensor:
        """(N, G) zero points of the stored codes (the constant ``2^(bits-1)`` if symmetric)."""
        if self.zeros is not None:
            return self.zeros
        half = 2 ** (self.bits - 1)
        return torch.full(self.scales.shape, half, dtype=torch.uint8, device=self.scales.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight this layer computes with."""
        return dequantize(self.centred_codes(), self.scales, None, self.group_size, dtype=dtype)

    def kernel_path(self, x: torch.Tensor) -> str:
        """Which matmul ``forward`` uses for ``x``: "gemv", "gemv_a8", "int4pack", "int8pack",
        "int4pack_cuda", "int8pack_cuda" or "dequant".

        Few rows (decode) run slimline's gemv kernel, which reads the packed codes as stored
        ("gemv_a8": with int8 activations, where ``decode_activations`` asks for them); where
        it cannot run, a warning (once per reason) names the fix. On a GPU, torch's CUDA
        weight-only kernels run where they fit (:func:`kernels_cuda.cuda_path`), else a
        warning names why.
        """
        if x.device.type == "cuda":
            path, problem = self._cuda_path(x)
            _warn_cuda_once(problem)
            return path
        if x.device.type != "cpu":
            return "dequant"
        rows = x.numel() // max(self.in_features, 1)
        needs_grad = x.requires_grad and torch.is_grad_enabled()  # gemv has no backward
        if rows <= GEMV_MAX_ROWS and not needs_grad and self._a8_runs():
            return "gemv_a8"
        if rows <= GEMV_MAX_ROWS and not needs_grad and self._gemv_problem(x.dtype) == "":
            return "gemv"
        path = self._torch_kernel_path(x.dtype, rows)
        if rows <= GEMV_MAX_ROWS:
            _warn_once(self._gemv_problem(x.dtype), path)
        return path

    def _cuda_path(self, x: torch.Tensor) -> tuple[str, str]:
        if not _CUDA_OPERATORS:
            for operator in ("_weight_int4pack_mm", "_weight_int8pack_mm"):
                _CUDA_OPERATORS[operator] = cuda.registered_on_cuda(operator)
        return cuda.cuda_path(
            bits=self.bits, symmetric=self.symmetric, per_channel=self.scales.shape[1] == 1,
            out_features=self.out_features, in_features=self.in_features, group=self.group,
            dtype=x.dtype, rows=x.numel() // max(self.in_features, 1),
            needs_grad=x.requires_grad and torch.is_grad_enabled(),
            capability=_capability(x.device),
            registered=_CUDA_OPERATORS,
        )  # fmt: skip

    def _torch_kernel_path(self, dtype: torch.dtype, rows: int) -> str:
        int4 = self.bits == 4 and self._int4_group() is not None
        if int4 and rows <= _INT4PACK_MAX_ROWS.get(dtype, 0):
            return "int4pack"
        int8 = self.bits == 8 and self.symmetric and self.scales.shape[1] == 1
        if int8 and kernels.int8pack_fits(self.in_features):
            return "int8pack" if rows <= _INT8PACK_MAX_ROWS.get(dtype, 0) else "dequant"
        return "dequant"

    def _a8_runs(self) -> bool:
        """Whether decode-sized calls take the int8-activation kernel (any float x dtype)."""
        if self.decode_activations != "int8":
            return False
        problem = gemv.a8_unsupported(self.bits, self.in_features, self.group) or (
            gemv.library_problem()
        )
        if problem == "":
            return True
        if problem not in _WARNED:
            _WARNED.add(problem)
            warnings.warn(
                f"QuantLinear: decode_activations 'int8' cannot run here ({problem}); "
                "decode-sized calls keep float activations.",
                RuntimeWarning,
                stacklevel=4,
            )
        return False

    def _gemv_problem(self, dtype: torch.dtype) -> str:
        """Why the gemv kernel does not run this layer for ``dtype`` inputs ("" if it does)."""
        if dtype == torch.bfloat16 and _native_bf16():
            return "native"  # torch's bfloat16 kernels, measured on such a CPU, keep the call
        problem = gemv.gemv_unsupported(self.bits, self.in_features, self.group, self.scales.dtype)
        return problem or gemv.library_problem()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._decode_call(x)
        if call is not None:
            return call(x)
        path = self.kernel_path(x)
        if path in ("gemv", "gemv_a8"):
            return gemv.gemv_linear(
                x, self.qweight, self.scales, self.zeros, self.bias, bits=self.bits,
                group=self.group, int8_activations=path == "gemv_a8",
            )  # fmt: skip
        if path == "int4pack":
            group = self._int4_group()
            table = self._derive(
                f"int4_table_{x.dtype}", lambda: self._int4_table(x.dtype, group or 1)
            )
            packed = self._derive(
                "int4_weight", lambda: kernels.int4pack_weight(self.stored_codes())
            )
            return kernels.int4pack_linear(x, packed, group or 0, table, self.bias)
        if path in ("int8pack", "int8pack_cuda"):  # one operator, CPU and CUDA kernels
            weight = self._derive("int8_weight", self._int8_weight)
            return kernels.int8pack_linear(x, weight, self.scales[:, 0], self.bias)
        if path == "int4pack_cuda":
            group = cuda.int4_group(self.out_features, self.in_features, self.group) or 0
            table = self._derive(
                "int4_cuda_table", lambda: self._int4_table(torch.bfloat16, group)
            )
            packed = self._derive("int4_cuda_weight", lambda: cuda.int4_weight(self.stored_codes()))
            return kernels.int4pack_linear(x, packed, group, table, self.bias)
        if self._tiles_run(x):
            return gemv.tiled_linear(
                x, self.qweight, self.scales, self.zeros, self.bias, bits=self.bits,
                group=self.group,
            )  # fmt: skip
        return kernels.dequant_linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _tiles_run(self, x: torch.Tensor) -> bool:
        """Whether a "dequant" call dequantizes tile by tile in C (eager CPU inference with
        float x on a grid the gemv library reads) rather than through torch ops."""
        return (
            x.is_cpu
            and x.dtype in _DTYPES.values()
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()
            and not gemv.dispatch_mode_active()
            and gemv.gemv_unsupported(self.bits, self.in_features, self.group,
                                      self.scales.dtype) == ""
            and gemv.library_problem() == ""
        )  # fmt: skip

    def _decode_call(self, x: torch.Tensor) -> gemv.GemvCall | None:
        """The prepared gemv call for an eager decode-sized call (None: ``kernel_path`` decides).

        The path for an x dtype is fixed by the layer and the machine, so it is chosen once
        (with ``kernel_path``'s warnings) and kept with its arguments until the buffers change.
        """
        if (
            not x.is_cpu
            or x.numel() > GEMV_MAX_ROWS * self.in_features
            or (x.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()
            or gemv.dispatch_mode_active()
        ):
            return None
        key = (x.dtype, self.decode_activations)
        if key not in self._calls:
            path = self.kernel_path(x)
            self._calls[key] = None
            if path in ("gemv", "gemv_a8"):
                self._calls[key] = gemv.GemvCall(
                    self.qweight, self.scales, self.zeros, self.bias,
                    in_features=self.in_features, bits=self.bits, group=self.group,
                    int8_activations=path == "gemv_a8",
                )  # fmt: skip
        call = self._calls[key]
        if call is not None and not call.reads(self._fast("qweight"), self._fast("scales"),
                                               self._fast("bias")):
            self.refresh_kernels()  # a buffer was replaced by assignment
            return self._decode_call(x)
        return call

    def prepared_call(self, dtype: torch.dtype) -> gemv.GemvCall | None:
        """The decode call prepared for ``dtype`` inputs if it is still this layer's (its
        buffers not replaced since), else None; prepares nothing."""
        call = self._calls.get((dtype, self.decode_activations))
        if call is None or not call.reads(self._fast("qweight"), self._fast("scales"),
                                          self._fast("bias")):
            return None
        return call

    def _fast(self, name: str) -> Any:
        """A buffer read from ``_buffers`` without ``Module.__getattr__`` (which is slow, and
        this runs once per layer and decode token); any other attribute as usual."""
        buffers = self._buffers
        return buffers[name] if name in buffers else getattr(self, name)

    def _derive(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A kernel layout of the buffers (made once); every layout is made again after a
        buffer is replaced by assignment (``layer.qweight = ...``), as the decode calls are."""
        buffers = self._buffers
        sources = (buffers.get("qweight"), buffers.get("scales"), buffers.get("zeros"))
        held = self._derived.get("_sources")
        if not isinstance(held, tuple) or any(a is not b for a, b in zip(held, sources,
                                                                          strict=True)):
            self._derived = {"_sources": sources}
        tensor = self._derived.get(key)
        if tensor is None:
            tensor = make()
            self._derived[key] = tensor
        return tensor

    def _int4_group(self) -> int | None:
        return kernels.int4pack_group(self.out_features, self.in_features, self.group)

    def _int4_table(self, dtype: torch.dtype, group: int) -> torch.Tensor:
        """The int4 kernels' (K/group, N, 2) scale and offset table, CPU's and CUDA's alike."""
        groups = self.in_features // group
        return kernels.int4pack_scales_zeros(self.scales, self.zero_points(), groups, dtype)

    def _int8_weight(self) -> torch.Tensor:
        return self.centred_codes()

    def extra_repr(self) -> str:
        group = "per-channel" if self.group_size is None else f"group_size={self.group_size}"
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, {group}, {kind}, bias={self.bias is not None}"
        )

    def slimline_meta(self) -> dict[str, Any]:
        return {
            "version": META_VERSION,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "bias": self.bias is not None,
            "scale_dtype": _dtype_name(self.scales.dtype),
            "bias_dtype": _dtype_name(self.bias.dtype) if self.bias is not None else "float32",
            "decode_activations": self.decode_activations,
        }

    @classmethod
    def from_slimline_meta(cls, meta: dict[str, Any]) -> nn.Module:
        _check_version(meta)
        return cls(
            int(meta["in_features"]), int(meta["out_features"]), bits=int(meta["bits"]),
            group_size=meta["group_size"], symmetric=bool(meta["symmetric"]),
            bias=bool(meta["bias"]), scale_dtype=_dtype(meta["scale_dtype"]),
            bias_dtype=_dtype(meta["bias_dtype"]),
            # absent from checkpoints written before it existed: they decoded in float32
            decode_activations=str(meta.get("decode_activations", "float")),
        )  # fmt: skip


def decode_rows(model: nn.Module) -> int:
    """The most tokens one forward of ``model`` may hold for each of its QuantLinear layers to
    take the decode kernel (:data:`GEMV_MAX_ROWS`: whose numerics, with int8 activations, are
    not the larger calls' float ones); ``sys.maxsize`` for a model without them."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        return GEMV_MAX_ROWS
    return sys.maxsize


@torch.compiler.assume_constant_result  # a fact of the machine: a constant when compiling
def _native_bf16() -> bool:
    if "cpu" not in _NATIVE_BF16:
        _NATIVE_BF16["cpu"] = cpu_bf16_supported()
    return _NATIVE_BF16["cpu"]


def _warn_reason(problem: str, message: str) -> None:
    """Warn ``message`` once per ``problem`` (none for "" or "native")."""
    if problem in ("", "native") or problem in _WARNED:
        return
    _WARNED.add(problem)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _warn_once(problem: str, path: str) -> None:
    """Warn, once per reason, that few-row (decode) calls miss the gemv kernel, and the fix."""
    _warn_reason(problem, (
        f"QuantLinear: {problem}; decode-sized calls run the {path!r} path instead, which on "
        "CPUs without AVX-512 is slower than float32 at batch 1. Fix: quantize with bits 4 "
        "(even group_size) or 8, on an x86 CPU with AVX2 and a C compiler (gcc, or $CC)."
    ))


def _capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, asked once per device (every packed layer asks per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


def _warn_cuda_once(problem: str) -> None:
    """Warn, once per reason, that a GPU call dequantizes the whole weight instead of reading
    the codes with one of torch's weight-only CUDA kernels."""
    _warn_reason(problem, f"QuantLinear on CUDA: {problem}; the layer dequantizes its weight "
                 "every call.")


def _check_version(meta: dict[str, Any]) -> None:
    if meta.get("version") != META_VERSION:
        raise ValueError(f"quantized layer metadata version {meta.get('version')!r} unsupported")
