"""Parity of an exported model with its torch model: the numbers an export is judged by.

An exporter can write a graph that runs and answers wrongly (``torch.onnx.export(dynamo=True)``
has known wrong-output bugs; a traced graph can freeze a shape it saw once), so every export is
run on the example and on a second batch of another batch size and sequence length, and
compared with the torch model on the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from slimline.core.batches import Batch

# fp32 graphs differ from eager torch by reassociated sums only: ~1e-6 relative here; 1e-4
# of the output's scale leaves two orders of margin and still catches a wrong op.
ATOL = 1e-4
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class ParityCheck:
    """One comparison: input shape, max abs difference, cosine, and whether it passed."""

    shape: list[int]  # the first input's shape, (B, T) for token batches
    max_abs_diff: float
    cosine: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(reference: torch.Tensor, exported: torch.Tensor, shape: list[int]) -> ParityCheck:
    """Compare ``exported`` with ``reference`` (same shape): passes when the max abs difference
    is within ``ATOL`` of the reference's scale (max |ref|, at least 1) and the cosine of the
    flattened outputs is at least ``MIN_COSINE``."""
    if tuple(reference.shape) != tuple(exported.shape):
        return ParityCheck(shape, float("inf"), 0.0, False)
    ref, out = reference.double().flatten(), exported.double().flatten()
    if not torch.equal(torch.isnan(ref), torch.isnan(out)):
        return ParityCheck(shape, float("nan"), float("nan"), False)
    finite = ~torch.isnan(ref)  # NaN where both are NaN counts as agreement
    ref, out = ref[finite], out[finite]
    diff = float((ref - out).abs().max()) if ref.numel() else 0.0
    cos = float(torch.nn.functional.cosine_similarity(ref, out, dim=0, eps=1e-30)) \
        if ref.numel() else 1.0
    if not ref.abs().any() and not out.abs().any():
        cos = 1.0  # two zero outputs are the same output
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return ParityCheck(shape, diff, cos, diff <= ATOL * scale and cos >= MIN_COSINE)


def second_example(batch: Batch) -> Batch:
    """A batch of another batch size and sequence length, made from ``batch``'s own rows:
    one row more (the first repeated), and for 2-D integer inputs (token ids, masks) one
    column less (a prefix stays a valid, equally padded sequence), or one more when only one."""
    if isinstance(batch, torch.Tensor):
        return _resize(batch)
    if isinstance(batch, Mapping):
        return {k: _resize(v) for k, v in batch.items()}
    return tuple(_resize(t) for t in batch)


def _resize(t: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(t.shape[0] + 1) % t.shape[0]
    t = t[rows]
    if is_sequence(t):
        width = t.shape[1]
        cols = torch.arange(width - 1 if width > 1 else 2) % width
        t = t[:, cols]
    return t


def is_sequence(t: torch.Tensor) -> bool:
    """Whether ``t`` is (B, T) token data, whose second axis is a sequence length."""
    return t.dim() == 2 and not t.is_floating_point() and not t.is_complex()
