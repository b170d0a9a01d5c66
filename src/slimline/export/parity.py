"""Parity of an exported model with its torch model: the numbers an export is judged by.

An exporter can write a graph that runs and answers wrongly (``torch.onnx.export(dynamo=True)``
has known wrong-output bugs; a traced graph can freeze a shape it saw once), so every export is
run on the example, on a second batch of another batch size and sequence length, and for
token batches on one of a single token (a decoder's decode step; a traced graph can freeze a
mask built for longer sequences) and on a left-padded one (``position_ids`` counted over the
real tokens), and compared with the torch model on the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from slimline.core.batches import Batch, positions_from_mask, token_mask

# fp32 graphs differ from eager torch by reassociated sums only: ~1e-6 relative here; 1e-4
# of the output's scale leaves two orders of margin and still catches a wrong op.
ATOL = 1e-4
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Tolerance:
    """What an export must meet: max abs difference within ``atol`` of the output's scale,
    cosine at least ``min_cosine``. The defaults are for float models. A W8A8 model is
    rounding-sensitive: its activations are rounded to a grid, a runtime that reassociates
    float32 sums rounds some near-tie values the other way, and the flips add up over layers —
    all-MiniLM-L6-v2 under ``int8_dynamic`` moves to cosine 0.9986 (max abs 0.17) of itself
    when its embeddings change by 1e-6 relative, and its OpenVINO export lands at 0.998. Such
    an export is held to a tolerance measured on the model itself (:func:`within_rounding`),
    or to a looser one its user chooses."""

    atol: float = ATOL
    min_cosine: float = MIN_COSINE

    def __post_init__(self) -> None:
        if not (isinstance(self.atol, (int, float)) and self.atol >= 0):
            raise ValueError(f"export: atol must be a number >= 0, got {self.atol!r}")
        if not (isinstance(self.min_cosine, (int, float)) and -1 <= self.min_cosine <= 1):
            raise ValueError(f"export: min_cosine must be in [-1, 1], got {self.min_cosine!r}")

    def to_dict(self) -> dict[str, float]:
        return {"atol_of_scale": self.atol, "min_cosine": self.min_cosine}


STRICT = Tolerance()


def loosest(tols: list[Tolerance]) -> Tolerance:
    """The widest of ``tols``: largest ``atol``, smallest ``min_cosine``."""
    return Tolerance(max(t.atol for t in tols), min(t.min_cosine for t in tols))


@dataclass(frozen=True)
class ParityCheck:
    """One comparison: input shape, max abs difference, cosine, and whether it passed."""

    shape: list[int]  # the first input's shape, (B, T) for token batches
    max_abs_diff: float
    cosine: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    reference: torch.Tensor, exported: torch.Tensor, shape: list[int], tol: Tolerance = STRICT
) -> ParityCheck:
    """Compare ``exported`` with ``reference`` (same shape): passes when the max abs difference
    is within ``tol.atol`` of the reference's scale (max |ref|, at least 1) and the cosine of
    the flattened outputs is at least ``tol.min_cosine``."""
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
    return ParityCheck(shape, diff, cos, diff <= tol.atol * scale and cos >= tol.min_cosine)


def compare_batch(
    reference: torch.Tensor, exported: torch.Tensor, batch: Batch, tol: Tolerance = STRICT
) -> ParityCheck:
    """:func:`compare` on ``batch``'s outputs, over its real tokens only when the outputs are
    per token (B, T, ...) and the batch has an ``attention_mask``: at a padded position the
    torch model's answer is arbitrary (a fully masked attention row is NaN in one runtime,
    zero in another) and no caller reads it."""
    shape = list(batch_tensors(batch)[0].shape)
    return compare(*_real_tokens(reference, exported, batch), shape, tol)


def _real_tokens(
    reference: torch.Tensor, exported: torch.Tensor, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs at ``batch``'s real tokens, when they are per token; else as they are."""
    mask = token_mask(batch)
    if mask is not None and tuple(reference.shape[:2]) == tuple(mask.shape) \
            and tuple(exported.shape) == tuple(reference.shape):
        return reference[mask], exported[mask]
    return reference, exported


# How far past a W8A8 model's own rounding sensitivity an export may land (see
# :func:`within_rounding`): two float orders of the same arithmetic diverge by a cascade of
# near-tie flips whose size varies between orders and inputs. all-MiniLM-L6-v2 under
# int8_dynamic, OpenVINO 2026.4 against torch 2.13's kernels: 1 - cos of 0.64x that of the
# modelled runtime (``export/lowering.py``'s ``jittered``) on the example.
ROUNDING_SPREAD = 2.0


def within_rounding(
    reference: torch.Tensor, reordered: torch.Tensor, batch: Batch, base: Tolerance = STRICT
) -> tuple[Tolerance, ParityCheck]:
    """The tolerance an export of a W8A8 model is held to on ``batch``, and the measurement it
    is derived from.

    A W8A8 layer rounds its activations to a grid, so a change of float32 association (a
    runtime fusing or reordering sums) flips the rounding of the rare near-tie value; through
    attention every later token and layer sees the flip, and the divergence grows with depth
    to the size of the quantization noise itself (all-MiniLM-L6-v2 under ``int8_dynamic``:
    cosine 0.9992 between its torch kernels and the same layers written in standard
    operators, at 3e-7 per layer). ``reordered`` is the torch model computed as another
    runtime would (``export/lowering.py``'s layers, their inputs ``jittered`` by a few
    float32 ulps): the export must stay within
    :data:`ROUNDING_SPREAD` times that divergence, and never stricter than ``base``. Where
    the rounding cannot cascade (a single token: no attention across positions) the two
    agree to float32 rounding and the tolerance stays ``base``: every operator is still
    checked to float precision there."""
    seen = compare_batch(reference, reordered, batch, base)
    ref = _real_tokens(reference, reordered, batch)[0]
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    atol = max(base.atol, ROUNDING_SPREAD * seen.max_abs_diff / scale)
    min_cosine = min(base.min_cosine, 1.0 - ROUNDING_SPREAD * (1.0 - seen.cosine))
    return Tolerance(atol, max(-1.0, min_cosine)), seen


def parity_examples(batch: Batch) -> list[Batch]:
    """The batches an export is checked on: ``batch``, :func:`second_example`, and for token
    batches :func:`one_token` and, with an ``attention_mask``, :func:`left_padded`."""
    examples = [batch, second_example(batch)]
    if any(is_sequence(t) for t in batch_tensors(batch)):
        examples.append(one_token(batch))
    padded = left_padded(batch)
    if padded is not None:
        examples.append(padded)
    return examples


def one_token(batch: Batch) -> Batch:
    """``batch`` with every (B, T) token input cut to its first column: (B, 1)."""
    return _map(batch, lambda t: t[:, :1] if is_sequence(t) else t)


def left_padded(batch: Batch) -> Batch | None:
    """``batch`` with its last row's first quarter (at least one token) turned to padding in
    ``attention_mask``, and ``position_ids``, if given, counted over the real tokens; None
    when the batch has no 2-D mask or its rows are a single token."""
    if not isinstance(batch, Mapping):
        return None
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or not is_sequence(mask) or mask.shape[1] < 2:
        return None
    padded = mask.clone()
    width = padded.shape[1]
    padded[-1] = 1
    padded[-1, : max(1, width // 4)] = 0
    out = dict(batch)
    out["attention_mask"] = padded
    if "position_ids" in out:
        out["position_ids"] = positions_from_mask(padded)
    return out


def _map(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: fn(v) for k, v in batch.items()}
    return tuple(fn(t) for t in batch)


def batch_tensors(batch: Batch) -> tuple[torch.Tensor, ...]:
    """A batch's tensors in order (a dict's values, a tuple's items, or the one tensor)."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return tuple(batch.values()) if isinstance(batch, Mapping) else tuple(batch)


def second_example(batch: Batch) -> Batch:
    """A batch of another batch size and sequence length, made from ``batch``'s own rows:
    one row more (the first repeated), and for 2-D integer inputs (token ids, masks) one
    column less (a prefix stays a valid, equally padded sequence), or one more when only one."""
    return _map(batch, _resize)


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
