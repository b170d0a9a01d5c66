"""slimline's own weight-only matmul for few rows (decode): int4/int8 codes, float32 maths.

At batch 1 a decode step reads every weight once for two flops, so its time is the bytes it
reads: a packed int4 layer could run in an eighth of float32's time. torch 2.13's CPU
weight-only kernels do not deliver that on an AVX2 CPU without AVX-512:
``aten._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu`` run float32
activations through scalar loops (4-8x *slower* than float32 ``F.linear`` at one row,
2048x5632 layers) and are fast only in bfloat16, which rounds the activations; dequantizing
to float32 first writes and reads four bytes a weight on every call (25-60x slower).

The kernel here (``csrc/gemv_weight_only.c``) reads the codes as ``QuantLinear`` stores them
— no second layout; its only extra memory is per call and small: x in float32 (and a
permuted copy), (M, K) floats, and group sums of x, (M, G) — widens the codes in registers
and accumulates in float32:
``y[m, n] = Σ_g s[n,g] · Σ_{k∈g} (u[n,k] - z[n,g]) · x[m,k]``, the same products as the
dequantized reference in another order. Codes are centred in integers before conversion, so
a symmetric layer sums exactly the reference's products. Activations of any float dtype are
widened to float32 and the result cast back (as accurate as the float32 reference, more
than a bfloat16 GEMM).

Where the CPU has AVX-512 (F, BW, VL, DQ; checked at run time) the C file's AVX-512 loop
runs instead: int4 codes become the group's dequantized values by one table lookup
(``vpermps``) per 16 codes, no mask and conversion (``benchmarks/quant_kernels.py``
times both instruction sets); at one row of x with groups of 128 columns, a 64-byte load of
a row's codes feeds eight lookups, each after one shift, with no widening. For one row of
x (a decode step) both kernels' AVX-512 loops compute four int4 outputs a pass, loading each
chunk of x once for four weight rows, with each output's sums in the order the same call's
outputs taken one at a time use (the same bits); so does the int8-activation kernel's AVX2
loop, for int4 (64 columns a 32-byte load) and int8.

It is compiled at first use (:mod:`slimline.core.native`: the system C compiler, AVX2 + FMA
+ F16C with the AVX-512 functions by target attributes, cached by digest) and loaded with
ctypes; OpenMP's threads are torch's (``torch.set_num_threads``). Under ``torch.compile`` it
is an opaque custom op (``slimline_kernels::gemv``).
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from slimline.core import native

SOURCE = Path(__file__).with_name("csrc") / "gemv_weight_only.c"
# The int8-activation kernel (llama.cpp's way: x rounded to int8 in blocks of 32, integer
# dot products; AVX-512 VNNI or AVX2, chosen at run time), built into the same library.
SOURCE_A8 = Path(__file__).with_name("csrc") / "gemv_int8_activations.c"
A8_BLOCK = 32  # columns of x sharing one int8 scale
A8_ISAS = {1: "avx2", 2: "avx512_vnni"}  # the int8-activation kernel's instruction sets
FLOAT_ISAS = {1: "avx2", 2: "avx512"}  # the float32 kernel's (AVX-512: int4 by table lookup)
_A8_ISA_CODES = {name: code for code, name in A8_ISAS.items()}
_FLOAT_ISA_CODES = {name: code for code, name in FLOAT_ISAS.items()}
GEMV_BITS = (4, 8)
_SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OP = "slimline_kernels::gemv"


@dataclass(frozen=True)
class Library:
    """The loaded kernel, or why there is none (``reason`` names the fix)."""

    function: ctypes._CFuncPtr | None  # type: ignore[name-defined]
    reason: str = ""
    int8_activations: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
    isa: str = ""  # the int8-activation kernel's instruction set here
    float_isa: str = ""  # the float32 kernel's
    dequant_rows: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]


def gemv_unsupported(bits: int, in_features: int, group: int, scale_dtype: torch.dtype) -> str:
    """Why this layer's grid has no gemv kernel ("" when it has one), with the fix."""
    if bits not in GEMV_BITS:
        return f"{bits}-bit codes have no fast decode kernel (it has 4 and 8 bits)"
    if bits == 4 and (in_features % 2 or group % 2):
        return (f"4-bit rows of {in_features} columns in groups of {group} do not start on "
                "a byte (the kernel needs an even width and an even group_size)")
    if scale_dtype not in _SCALE_KINDS:
        return f"scales stored as {scale_dtype} (the kernel reads float32/float16/bfloat16)"
    return ""


def a8_unsupported(bits: int, in_features: int, group: int) -> str:
    """Why this layer's grid has no int8-activation kernel ("" when it has one)."""
    if bits not in GEMV_BITS:
        return f"{bits}-bit codes have no int8-activation kernel (it has 4 and 8 bits)"
    if in_features % A8_BLOCK:
        return f"rows of {in_features} columns are not whole blocks of {A8_BLOCK}"
    if group < in_features and group % A8_BLOCK:
        return f"groups of {group} columns are not whole blocks of {A8_BLOCK}"
    return ""


@torch.compiler.assume_constant_result  # a fact of the machine: a constant when compiling
def library_problem() -> str:
    """Why the kernel cannot run on this machine ("" when it can); builds it if needed."""
    reason = _library().reason
    if not reason:
        register_gemv_op()
    return reason


@functools.cache
def _library() -> Library:
    lib = native.load_library("gemv kernel", "gemv_weight_only", (SOURCE, SOURCE_A8))
    if isinstance(lib, str):
        return Library(None, lib)
    function = lib.slimline_gemv
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    function.restype = ctypes.c_int
    function.argtypes = [pointer, size, size, pointer, size, ctypes.c_int, size, pointer,
                         ctypes.c_int, pointer, pointer, pointer, ctypes.c_int]  # fmt: skip
    a8 = lib.slimline_gemv_a8
    a8.restype = ctypes.c_int
    a8.argtypes = [pointer, size, size, pointer, size, ctypes.c_int, size, pointer,
                   ctypes.c_int, pointer, pointer, ctypes.c_int]  # fmt: skip
    lib.slimline_gemv_a8_isa.restype = ctypes.c_int
    isa = A8_ISAS.get(lib.slimline_gemv_a8_isa(), "")
    dequant = lib.slimline_dequant_rows
    dequant.restype = ctypes.c_int
    dequant.argtypes = [pointer, size, size, ctypes.c_int, size, pointer, ctypes.c_int, pointer,
                        size, size, pointer, ctypes.c_int]  # fmt: skip
    lib.slimline_gemv_isa.restype = ctypes.c_int
    float_isa = FLOAT_ISAS.get(lib.slimline_gemv_isa(), "")
    return Library(function, int8_activations=a8, isa=isa, float_isa=float_isa,
                   dequant_rows=dequant)


def gemv_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    group: int,
    int8_activations: bool = False,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for packed codes (``QuantLinear``'s buffers), any float x.

    ``scales`` / ``zeros`` are (N, G); ``group`` the columns per group (the last group may be
    shorter). The caller checks :func:`gemv_unsupported` and :func:`library_problem` (which
    also defines the custom op) first. ``int8_activations``: x is first rounded to int8 in
    blocks of 32 columns (:func:`round_activations`; the caller checks
    :func:`a8_unsupported`), as llama.cpp's Q4_0/Q8_0 dot products round it, and the products
    are summed in integers; rows holding NaN or inf take the float32 kernel, which carries them.
    """
    if torch.compiler.is_compiling() or dispatch_mode_active():
        out: torch.Tensor = torch.ops.slimline_kernels.gemv(
            x, qweight, scales, zeros, bias, bits, group, int8_activations
        )
        return out
    return _gemv(x, qweight, scales, zeros, bias, bits, group, int8_activations)


def dispatch_mode_active() -> bool:
    """Whether a TorchDispatchMode (e.g. FlopCounterMode) watches: it must see an op."""
    return _get_current_dispatch_mode() is not None


def _gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    int8_activations: bool = False,
    isa: str = "",
) -> torch.Tensor:
    """The kernel call; ``isa`` picks an instruction set instead of the best the CPU has (for
    tests): "avx2" for either kernel, "avx512_vnni" for the int8-activation one, "avx512" for
    the float32 one."""
    call = GemvCall(
        qweight, scales, zeros, bias, in_features=x.shape[-1], bits=bits, group=group,
        int8_activations=int8_activations, isa=isa,
    )  # fmt: skip
    return call(x)


class GemvCall:
    """One layer's kernel call with its constant arguments resolved once.

    At batch 1 a decode step calls the kernel once per linear layer for a few microseconds of
    work each, so the checks, ``.contiguous()`` copies and argument conversions around the
    call are a measurable share of a token; ``QuantLinear`` keeps one of these per x dtype
    and pays them once. It holds the tensors whose pointers it passes, so they stay alive.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bias: torch.Tensor | None,
        *,
        in_features: int,
        bits: int,
        group: int,
        int8_activations: bool = False,
        isa: str = "",
    ) -> None:
        library = _library()
        if library.function is None:
            raise RuntimeError(library.reason)
        self.qweight, self.bias, self._given_scales = qweight, bias, scales
        self.scales = scales.contiguous()
        self.zeros = None if zeros is None else zeros.contiguous()
        self.k, self.n, self.groups = in_features, scales.shape[0], scales.shape[1]
        self.bits, self.group = bits, group
        zeros_ptr = None if self.zeros is None else self.zeros.data_ptr()
        # The arguments between M and the output pointer(s), in the C functions' order.
        kind = _SCALE_KINDS[self.scales.dtype]
        self._args = (in_features, qweight.data_ptr(), self.n, bits, group,
                      self.scales.data_ptr(), kind, zeros_ptr)  # fmt: skip
        self._float = library.function
        self._a8 = library.int8_activations if int8_activations else None
        self._isa = _A8_ISA_CODES.get(isa, 0)
        self._float_isa = _FLOAT_ISA_CODES.get(isa, 0)
        # x's shape last seen, the output's shape for it and its rows M (Python's work per
        # call is a measurable share of a decode step's small layers)
        self._layout: tuple[torch.Size | None, tuple[int, ...], int] = (None, (), 0)

    def reads(
        self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> bool:
        """Whether this call was prepared from these very tensors (not replaced since)."""
        return self.qweight is qweight and self._given_scales is scales and self.bias is bias

    def native_fields(self) -> tuple[int | None, ...] | None:
        """This call for C code that runs it itself (``fast_decode``'s block step): pointers
        to the codes, scales, zero points (None: symmetric) and bias (None: none), then
        in_features, out_features, bits, group, the scales' kind and 1 for the int8-activation
        kernel (else 0); None when the bias is not contiguous float32 (the C side adds it)."""
        bias = self.bias
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            return None
        k, qweight, n, bits, group, scales, kind, zeros = self._args
        return (qweight, scales, zeros, None if bias is None else bias.data_ptr(), k, n, bits,
                group, kind, int(self._a8 is not None))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape != self._layout[0]:  # a decode step repeats its shape: worked out once
            if not shape or shape[-1] != self.k:
                raise ValueError(f"gemv: x of shape {tuple(shape)} for a layer of {self.k} inputs")
            self._layout = (shape, (*shape[:-1], self.n), math.prod(shape[:-1]))
        rows = x if x.dtype == torch.float32 else x.to(torch.float32)
        if not rows.is_contiguous():
            rows = rows.contiguous()  # (M, K) in memory
        m = self._layout[2]
        out = torch.empty(self._layout[1], dtype=torch.float32)
        if m == 0:
            return self._finish(out, x)
        if self._a8 is not None:
            status = self._a8(rows.data_ptr(), m, *self._args, out.data_ptr(), self._isa)
            if status == 0:
                return self._finish(out, x)
            if status != 1:  # 1: NaN or inf in x, which the float32 kernel below carries
                raise ValueError(
                    f"int8-activation gemv refused bits={self.bits}, K={self.k}, "
                    f"group={self.group}"
                )
        xsum = None if self.zeros is None else torch.empty(m, self.groups)
        status = self._float(
            rows.data_ptr(), m, *self._args, None if xsum is None else xsum.data_ptr(),
            out.data_ptr(), self._float_isa,
        )  # fmt: skip
        if status != 0:
            raise ValueError(
                f"gemv kernel refused bits={self.bits}, K={self.k}, group={self.group}"
            )
        return self._finish(out, x)

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            out += self.bias
        if x.dtype != torch.float32:
            out = out.to(x.dtype)
        return out


# A float32 weight tile: in cache while the GEMM reads it, and wide enough (512 rows of 2048)
# for torch's CPU GEMM to run at F.linear's speed; 128-row tiles ran it markedly slower.
DEQUANT_TILE_BYTES = 4 << 20


def dequantize_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    in_features: int,
    bits: int,
    group: int,
    rows: tuple[int, int],
    out: torch.Tensor | None = None,
    isa: str = "",
) -> torch.Tensor:
    """Output rows ``[n0, n1)`` of the dequantized weight in float32, ``(u - z) · s`` —
    ``packing.dequantize``'s values bit for bit — from ``QuantLinear``'s buffers, by the C
    library (``out``: a contiguous (n1 - n0, K) float32 tensor to fill). ``isa`` as
    :func:`_gemv`'s ("avx2", "avx512"; "" for the best)."""
    library = _library()
    if library.dequant_rows is None:
        raise RuntimeError(library.reason)
    n0, n1 = rows
    n = scales.shape[0]
    if not 0 <= n0 < n1 <= n:
        raise ValueError(f"dequantize_rows: rows {n0}..{n1} are not a range within 0..{n}")
    if out is None:
        out = torch.empty(n1 - n0, in_features)
    scales = scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    status = library.dequant_rows(
        qweight.data_ptr(), n, in_features, bits, group, scales.data_ptr(),
        _SCALE_KINDS[scales.dtype], None if zeros is None else zeros.data_ptr(), n0, n1,
        out.data_ptr(), _FLOAT_ISA_CODES.get(isa, 0),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"dequantize kernel refused bits={bits}, K={in_features}, "
                         f"group={group}, rows {n0}..{n1} of {n}")  # fmt: skip
    return out


def tiled_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    group: int,
    isa: str = "",
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for many rows (prefill), in ``x``'s dtype.

    :func:`dequantize_rows` fills a float32 tile of output rows (at most
    :data:`DEQUANT_TILE_BYTES`) and torch's GEMM multiplies it while it is in cache: the layer
    is never whole in float32, and the codes are widened by the gemv kernel's vector loop
    instead of a chain of torch ops. Eager only (an opaque ctypes call); the caller checks
    :func:`gemv_unsupported` and :func:`library_problem` first.
    """
    k, n = x.shape[-1], scales.shape[0]
    tile_rows = max(16, DEQUANT_TILE_BYTES // (4 * k))
    bias = None if bias is None else bias.to(x.dtype)
    buffer = torch.empty(min(tile_rows, n), k)

    def tile(n0: int, n1: int) -> torch.Tensor:
        w = dequantize_rows(qweight, scales, zeros, in_features=k, bits=bits, group=group,
                            rows=(n0, n1), out=buffer[: n1 - n0], isa=isa)  # fmt: skip
        return w if x.dtype == torch.float32 else w.to(x.dtype)

    if n <= tile_rows:  # one tile: F.linear on the very weight dequantize() gives
        return F.linear(x, tile(0, n), bias)
    rows = x.reshape(-1, k)
    out = torch.empty(rows.shape[0], n, dtype=x.dtype)
    for n0 in range(0, n, tile_rows):
        n1 = min(n, n0 + tile_rows)
        torch.mm(rows, tile(n0, n1).t(), out=out[:, n0:n1])  # a column block of out, in place
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) rounded as the int8-activation kernel rounds it, in blocks of 32 columns:
    ``(q, s)`` with ``s = max|x_block| / 127`` (float32, (..., K/32)) and
    ``q = round_half_even(x · (127 / max|x_block|))`` (int8, (..., K)), the multiplier a
    float32 division (so the kernel vectorises it); all-zero blocks give ``s = 0, q = 0``.
    The reference the kernel's tests and accuracy figures use (llama.cpp's Q8_0 of x)."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, A8_BLOCK))
    top = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(top > 0, 127 / torch.where(top > 0, top, 1), 0)
    q = torch.round(blocks * inv).clamp(-127, 127)
    return q.to(torch.int8).flatten(-2), (top / 127).squeeze(-1)


@functools.cache
def register_gemv_op() -> None:
    """Define ``torch.ops.slimline_kernels.gemv`` (once, on first use; not at import).

    A custom op is opaque to ``torch.compile`` (inductor calls it as an extern kernel), and
    ``FlopCounterMode`` counts it with the formula below, which a bare ctypes call would hide.
    """
    op = torch.library.custom_op(_OP, mutates_args=())(_gemv_op)

    def fake(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bias: torch.Tensor | None,
        bits: int,
        group: int,
        int8_activations: bool,
    ) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], scales.shape[0])

    op.register_fake(fake)

    @register_flop_formula(torch.ops.slimline_kernels.gemv)
    def flops(x_shape: Any, qweight_shape: Any, scales_shape: Any, *_: Any, **__: Any) -> int:
        # (M, K) · (K, N): one multiply and one add per term, as FlopCounterMode counts mm.
        return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * scales_shape[0]


def _gemv_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group: int,
    int8_activations: bool,
) -> torch.Tensor:
    return _gemv(x, qweight, scales, zeros, bias, bits, group, int8_activations)
