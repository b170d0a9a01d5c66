"""ONNX's ``MatMulInteger`` as a torch op, so that W8A8 layers export as integer GEMMs.

``torch.ops.slimline.matmul_integer(a, b, a_zero, b_zero)`` is the ONNX operator's
arithmetic — ``(a - a_zero) · (b - b_zero)`` accumulated in int32, ``a`` (..., K) uint8,
``b`` (K, N) int8 or uint8, the zero points scalar tensors of their operand's dtype — and
both ONNX exporters write it as that operator (TorchScript tracing through a registered
symbolic, ``torch.export`` through a translation table, :func:`dynamo_translations`).
onnxruntime runs it on its int8 GEMM (MLAS's QGEMM).

In torch it computes in float64, exact while ``|acc| < 2^53``: it only runs while a graph
is traced and checked (``export/lowering.py``), never on a deployed model's path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

# The opset the symbolic is registered for and from which it is used (MatMulInteger: 10).
SYMBOLIC_OPSET = 10


def _matmul_integer(
    a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor, b_zero: torch.Tensor
) -> torch.Tensor:
    left = a.double() - a_zero.double()
    right = b.double() - b_zero.double()
    return torch.matmul(left, right).to(torch.int32)


@functools.cache
def register() -> None:
    """Define ``torch.ops.slimline.matmul_integer`` and its ONNX symbolic (once, on first use)."""
    op = torch.library.custom_op("slimline::matmul_integer", mutates_args=())(_matmul_integer)

    def fake(a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor, b_zero: torch.Tensor
             ) -> torch.Tensor:  # fmt: skip
        return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)

    op.register_fake(fake)

    def symbolic(g: Any, a: Any, b: Any, a_zero: Any, b_zero: Any) -> Any:
        return g.op("MatMulInteger", a, b, a_zero, b_zero)

    torch.onnx.register_custom_op_symbolic("slimline::matmul_integer", symbolic, SYMBOLIC_OPSET)


def matmul_integer(
    a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor, b_zero: torch.Tensor
) -> torch.Tensor:
    """``(a - a_zero) · (b - b_zero)`` in int32, as ONNX's ``MatMulInteger`` (module doc)."""
    register()
    out: torch.Tensor = torch.ops.slimline.matmul_integer(a, b, a_zero, b_zero)
    return out


def dynamo_translations() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: the op as
    ``MatMulInteger``."""
    from onnxscript import opset18 as ops

    register()

    def translate(a: Any, b: Any, a_zero: Any, b_zero: Any) -> Any:
        return ops.MatMulInteger(a, b, a_zero, b_zero)

    return {torch.ops.slimline.matmul_integer.default: translate}
