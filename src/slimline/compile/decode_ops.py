"""Float32 operations between a decode step's matmuls, one C call each (``fast_decode``).

RMSNorm and the rotary embedding are a few thousand flops at batch 1; as torch ops each costs
its dispatch several times over (measured on the 2-core AMD EPYC here: RMSNorm of 2048 values
~41 µs, rotary of 32 query heads ~44 µs; one C call ~8-9 µs). ``csrc/decode_ops.c`` does the
same arithmetic in one call each; ``csrc/decode_block.c`` adds attention of one query over
the cache and a whole block's step (:mod:`slimline.compile.decode_block`). It is built as
the gemv library is (:mod:`slimline.core.native`), with its kernels, and loaded with ctypes;
:func:`available` says whether it runs here, and callers keep the torch version for what it
does not take (tensors that are not contiguous float32).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import torch

from slimline.core import native

SOURCE = Path(__file__).with_name("csrc") / "decode_ops.c"
# A whole block's step (slimline.compile.decode_block), linked with the gemv kernels it calls.
BLOCK_SOURCE = Path(__file__).with_name("csrc") / "decode_block.c"
# The vectorised exp that decode_block.c and varlen_attention.c include.
EXP_HEADER = Path(__file__).with_name("csrc") / "vector_exp.h"


@functools.cache
def _library() -> Any:
    """The loaded library, or None where it cannot be built (then the torch ops run)."""
    from slimline.quantize import kernels_gemv

    if kernels_gemv.library_problem():  # same compiler and instruction-set needs
        return None
    sources = (SOURCE, BLOCK_SOURCE, kernels_gemv.SOURCE, kernels_gemv.SOURCE_A8)
    lib = native.load_library("decode operations", "decode_ops", sources, (EXP_HEADER,))
    if isinstance(lib, str):
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.slimline_rms_norm.restype = None
    lib.slimline_rms_norm.argtypes = [pointer, pointer, size, real, pointer]
    lib.slimline_rotate.restype = None
    lib.slimline_rotate.argtypes = [pointer, size, size, pointer, pointer, pointer]
    lib.slimline_attend.restype = None
    lib.slimline_attend.argtypes = [pointer, pointer, pointer, size, size, size, size, size, real,
                                    pointer, pointer]  # fmt: skip
    lib.slimline_decode_block.restype = ctypes.c_int
    lib.slimline_decode_block.argtypes = [pointer, pointer, pointer, pointer, size, size, pointer,
                                          pointer]  # fmt: skip
    return lib


def available() -> bool:
    """Whether the C operations run on this machine."""
    return _library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, arXiv 1910.07467) of one contiguous float32 row ``x`` (1, n)
    with a float32 ``weight`` (n,): ``x / sqrt(mean(x²) + eps) · weight``."""
    out = torch.empty_like(x)
    _library().slimline_rms_norm(x.data_ptr(), weight.data_ptr(), x.shape[-1], eps,
                                 out.data_ptr())  # fmt: skip
    return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al., arXiv 2104.09864) of contiguous float32 heads ``x``
    (heads, D) at one position (``cos`` / ``sin``: D contiguous float32 values), halves
    rotated as Llama's ``rotate_half`` does; a new tensor (x may be a tensor a hook kept)."""
    out = torch.empty_like(x)
    _library().slimline_rotate(x.data_ptr(), x.shape[0], x.shape[1], cos.data_ptr(),
                               sin.data_ptr(), out.data_ptr())  # fmt: skip
    return out


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of one query per head (``q``: (H, D)) over every cached position
    (``keys`` / ``values``: (KV, L, D), rows contiguous, H a multiple of KV; query head h reads
    head h // (H / KV), Ainslie et al., arXiv 2305.13245), scores and softmax in float32, as
    ``fast_decode.attend_one`` computes it; returns (1, H·D). Contiguous float32 only."""
    heads, dim = q.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    if keys.stride() != values.stride() or keys.stride()[1:] != (dim, 1):
        raise ValueError("attend: keys and values need the same strides and contiguous rows")
    out = torch.empty(1, heads * dim)
    scores = torch.empty(heads, length)
    _library().slimline_attend(q.data_ptr(), keys.data_ptr(), values.data_ptr(), length,
                               keys.stride()[0] // dim, heads, kv_heads, dim, scale,
                               scores.data_ptr(), out.data_ptr())  # fmt: skip
    return out


def library() -> Any:
    """The loaded library (call :func:`available` first)."""
    return _library()


def reads(*tensors: torch.Tensor) -> bool:
    """Whether the C operations take these tensors: float32 on the CPU, contiguous."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
               for t in tensors)
