"""Attention over sequences of different lengths: one C call, no padding computed.

Two layouts, one kernel (``csrc/varlen_attention.c``):

- packed (``unpad``): a BERT-like encoder's layers run on the real tokens of a padded batch,
  packed into one (tokens, hidden) matrix (ByteTransformer, Zhai et al., arXiv 2210.03052). Its
  attention used to scatter queries, keys and values back to the padded (batch, heads, length,
  head) layout, multiply there, mask the padded keys and gather the result back: on the
  built-in ``minilm``'s test batch (633 real tokens of 32 × 46) under
  ``recipes/encoder-cpu-fast.yaml`` that took about as long as all of its int8 GEMMs at 1
  thread (~37 ms of ~80). :func:`varlen_attention` attends within each sequence's own rows of
  the packed matrices instead (the varlen attention of FlashAttention's and ByteTransformer's
  GPU kernels): the work is Σ_b n_b² per head rather than batch · length², and nothing is
  scattered.
- padded (``compile``'s attention for encoders, :mod:`slimline.compile.encoder_attention`):
  :func:`padded_attention` takes the padded (batch · length, hidden) rows as they are and
  computes every query of a row over that row's real keys only, which is what the padded model
  computes with its key-padding mask, in length · Σ_b n_b per head rather than batch · length².

On long rows with little padding torch's fused kernel is faster, and :func:`pays` says when to
use it. Both are custom ops (``torch.ops.slimline.varlen_attention``, ``…padded_attention``),
opaque to ``torch.compile``, which calls them between the fused kernels around them. Built as
the other C kernels are (:mod:`slimline.core.native`) and loaded with ctypes; :func:`unsupported`
says when the kernel cannot run (no C compiler, not x86 with AVX2, a dtype other than float32 /
bfloat16, autograd asked for), and the caller then computes attention in torch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from slimline.compile.decode_ops import EXP_HEADER
from slimline.core import native

SOURCE = Path(__file__).with_name("csrc") / "varlen_attention.c"
_OP = "slimline::varlen_attention"
_PADDED_OP = "slimline::padded_attention"
_KINDS = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _library() -> Any:
    """The loaded library, or a string saying why there is none."""
    lib = native.load_library("varlen attention kernel", "varlen_attention", (SOURCE,),
                              (EXP_HEADER,))
    if isinstance(lib, str):
        return lib
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.slimline_varlen_attention.restype = ctypes.c_int
    lib.slimline_varlen_attention.argtypes = [
        pointer, pointer, pointer, size, size, size, pointer, size, size, size, ctypes.c_float,
        ctypes.c_int, pointer, size,
    ]  # fmt: skip
    lib.slimline_key_runs.restype = size
    lib.slimline_key_runs.argtypes = [pointer, size, size, pointer]
    _register_op()
    return lib


@torch.compiler.assume_constant_result  # a fact of the machine: a constant when compiling
def library_problem() -> str:
    """Why the kernel cannot run on this machine ("" when it can); builds it if needed."""
    found = _library()
    return found if isinstance(found, str) else ""


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_size: int) -> str:
    """Why :func:`varlen_attention` cannot take these projections, heads of ``head_size``
    columns ("" when it can)."""
    problem = library_problem()
    if problem:
        return problem
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _KINDS:
        return (f"queries, keys and values are {q.dtype}, {k.dtype}, {v.dtype} (float32 or "
                "bfloat16)")
    if any(t.device.type != "cpu" or t.dim() != 2 or t.stride(-1) != 1 for t in (q, k, v)):
        return ("queries, keys and values must be (tokens, width) CPU matrices with unit "
                "column stride")
    if head_size % 8 or q.shape[-1] % head_size:
        return f"heads of {head_size} columns (the kernel takes multiples of 8)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "autograd through the C kernel is not supported (torch computes it instead)"
    return ""


# When the kernel beats torch's fused attention on the padded layout (SDPA), measured at 1 thread
# on the 2-core AMD EPYC (Zen 4) here, 12 heads, kernel ÷ SDPA time: rows of up to 256
# positions, always faster (46: 0.13; 8 × 128-256: 0.80); 512 positions, half padding: 0.80 at
# head width 32, 0.97 at 64; nearly no padding (500-512 of 512, width 64): 1.25; 768 and more:
# 1.2-1.7 (its scores are held whole, n² floats a head, past the caches). So the kernel runs
# rows of up to ALWAYS positions, and longer batches when their real work Σ n_b² is at most
# WORK_SHARE of the padded batch · length².
ALWAYS = 256
WORK_SHARE = 0.75


def pays(mask: torch.Tensor) -> bool:
    """Whether the kernel is expected to beat attention on the padded layout for a batch with
    this 0/1 ``mask`` (batch, length), on the packed rows (the measurements above)."""
    batch, length = mask.shape
    if length <= ALWAYS:
        return True
    counts = (mask != 0).sum(dim=1)
    return int((counts * counts).sum()) <= WORK_SHARE * batch * length * length


def pays_padded(real_keys: int, batch: int, length: int) -> bool:
    """:func:`pays` for the padded layout: every one of ``length`` queries of a row over its
    real keys, ``real_keys`` in all over ``batch`` rows (work length · real_keys, scores of
    length × n floats a head)."""
    if length <= ALWAYS:
        return True
    return length * real_keys <= WORK_SHARE * batch * length * length


def key_ranges(mask: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """The kernel's (batch, 4) ranges of a padded batch under a key-padding ``mask`` (batch,
    length) — row b's length queries over its real keys — and the count of real keys; None
    when some row has no real key or its real keys are not one run (right or left padding)."""
    real = mask if mask.dtype in (torch.bool, torch.uint8, torch.int8) else mask != 0
    real = real.contiguous()
    ranges = torch.empty(mask.shape[0], 4, dtype=torch.int64)
    total = int(_library().slimline_key_runs(real.data_ptr(), mask.shape[0], mask.shape[1],
                                             ranges.data_ptr()))
    return None if total < 0 else (ranges, total)


def starts_of(mask: torch.Tensor) -> torch.Tensor:
    """(batch + 1,) int64 offsets of each row's real tokens in the packed order of a 0/1
    ``mask`` (batch, length): row b holds packed rows ``starts[b]`` to ``starts[b + 1] - 1``."""
    counts = (mask != 0).sum(dim=1)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                     heads: int, scale: float) -> torch.Tensor:
    """Softmax attention (Vaswani et al., arXiv 1706.03762) of packed sequences: ``q``, ``k``,
    ``v`` (T, heads · D), sequence b in rows ``starts[b]`` to ``starts[b + 1] - 1``, each head's
    queries attending over its own sequence's keys only; returns (T, heads · D) in ``q``'s
    dtype. Check :func:`unsupported` first."""
    problem = library_problem()  # also defines the op, on first use
    if problem:
        raise RuntimeError(problem)
    out: torch.Tensor = torch.ops.slimline.varlen_attention(q, k, v, starts, heads, scale)
    return out


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     heads: int, scale: float) -> torch.Tensor:
    """Softmax attention of padded rows under a key-padding ``mask`` (batch, length): ``q``,
    ``k``, ``v`` (batch · length, heads · D), row b in rows b · length to (b + 1) · length − 1;
    every query of row b (padded ones too) attends over row b's real keys only, as masked
    attention of the padded batch does. Where the real keys of some row are not one run, or a
    row has none, or the kernel would not pay (:func:`pays_padded`), torch's fused kernel
    computes it with the mask instead. Returns (batch · length, heads · D) in ``q``'s dtype.
    Check :func:`unsupported` first."""
    problem = library_problem()
    if problem:
        raise RuntimeError(problem)
    out: torch.Tensor = torch.ops.slimline.padded_attention(q, k, v, mask, heads, scale)
    return out


def _checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, what: str) -> int:
    """The head width of (rows, heads · D) projections the kernel takes, else ValueError."""
    if any(t.dim() != 2 or t.stride(-1) != 1 or t.shape[0] != q.shape[0] or t.dtype != q.dtype
           or t.device.type != "cpu" for t in (q, k, v)) or q.dtype not in _KINDS:  # fmt: skip
        raise ValueError(f"{what}: q, k, v must be CPU (tokens, width) matrices of one dtype "
                         "(float32 or bfloat16), rows of unit column stride")
    width = q.shape[1]
    if width % heads or width // heads % 8 or k.shape[1] != width or v.shape[1] != width:
        raise ValueError(f"{what}: widths {q.shape[1]}, {k.shape[1]}, {v.shape[1]} are not the "
                         f"same multiple of {heads} heads of a multiple of 8")
    return width // heads


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ranges: torch.Tensor,
            heads: int, dim: int, scale: float) -> torch.Tensor:
    """The C kernel over ``ranges`` (sequences, 4) int64 {q_start, m, k_start, n}; rows no
    range covers are left as ``torch.empty`` made them (callers cover every row)."""
    bounds = ranges.to(torch.int64).contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)
    failed = _library().slimline_varlen_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
        bounds.data_ptr(), bounds.shape[0], heads, dim, scale, _KINDS[q.dtype],
        out.data_ptr(), out.stride(0),
    )  # fmt: skip
    if failed:
        raise MemoryError("varlen attention: no memory for the per-thread scratch rows")
    return out


def _varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
               heads: int, scale: float) -> torch.Tensor:
    dim = _checked(q, k, v, heads, "varlen attention")
    bounds = starts.to(torch.int64).contiguous()
    if (bounds.dim() != 1 or len(bounds) < 2 or int(bounds[0]) != 0
            or int(bounds[-1]) != q.shape[0] or bool((bounds[1:] < bounds[:-1]).any())):
        raise ValueError(f"varlen attention: offsets {bounds.tolist()[:8]}... must rise from 0 "
                         f"to the {q.shape[0]} packed rows")
    first, lengths = bounds[:-1], bounds[1:] - bounds[:-1]
    return _attend(q, k, v, torch.stack([first, lengths, first, lengths], dim=1), heads, dim,
                   scale)


def _padded_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               heads: int, scale: float) -> torch.Tensor:
    dim = _checked(q, k, v, heads, "padded attention")
    if mask.dim() != 2 or mask.shape[0] * mask.shape[1] != q.shape[0]:
        raise ValueError(f"padded attention: a (batch, length) mask for {q.shape[0]} rows, "
                         f"not {tuple(mask.shape)}")
    if mask.device.type != "cpu":
        raise ValueError(f"padded attention: the mask is on {mask.device}, q, k, v on the CPU")
    batch, length = mask.shape
    found = key_ranges(mask)
    if found is None or not pays_padded(found[1], batch, length):
        return _masked(q, k, v, mask, heads, scale)
    return _attend(q, k, v, found[0], heads, dim, scale)


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            heads: int, scale: float) -> torch.Tensor:
    """:func:`padded_attention` by torch's fused kernel with the key-padding mask."""
    batch, length = mask.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(0, (batch, length)).unflatten(-1, (heads, -1)).transpose(1, 2)

    keep = (mask != 0)[:, None, None, :]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=keep,
                                         scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


@functools.cache
def _register_op() -> None:
    """Define ``torch.ops.slimline.varlen_attention`` and ``…padded_attention`` (once, when
    the library loads)."""
    for name, implementation in ((_OP, _varlen_op), (_PADDED_OP, _padded_op)):
        op = torch.library.custom_op(name, mutates_args=())(implementation)

        def fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, where: torch.Tensor,
                 heads: int, scale: float) -> torch.Tensor:
            return torch.empty_like(q, memory_format=torch.contiguous_format)

        op.register_fake(fake)

    # Two (m × D) · (D × n) products a head and sequence, counted as FlopCounterMode counts
    # bmm: 2 flops a multiply-add.
    @register_flop_formula(torch.ops.slimline.varlen_attention, get_raw=True)
    def packed_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                     heads: int, scale: float, *_: Any, **__: Any) -> int:
        lengths = starts[1:] - starts[:-1]
        return int(4 * int((lengths * lengths).sum()) * q.shape[1])

    @register_flop_formula(torch.ops.slimline.padded_attention, get_raw=True)
    def padded_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     heads: int, scale: float, *_: Any, **__: Any) -> int:
        return int(4 * mask.shape[1] * int((mask != 0).sum()) * q.shape[1])
