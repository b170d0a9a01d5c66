"""Running statistics of a layer's inputs, fed batch by batch from forward hooks.

One accumulator serves Wanda (the per-feature squared norms) and SparseGPT (the Hessian
H = 2/n · Σ x xᵀ of the layer-wise least-squares problem, arXiv 2301.00774 §3): both are sums
over tokens, so calibration activations are never kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_SLICE_TOKENS = 1024


class InputStats:
    """Accumulates Σ x² per feature and, optionally, X Xᵀ over all input tokens."""

    def __init__(self, in_features: int, *, hessian: bool) -> None:
        self.tokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64)
        self.xxt = torch.zeros(in_features, in_features) if hessian else None

    def add_batch(self, x: torch.Tensor) -> None:
        """``x`` (..., in): every leading position is one token."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        if self.sq_norm.device != flat.device:  # follow the activations (CPU or GPU)
            self.sq_norm = self.sq_norm.to(flat.device)
            self.xxt = self.xxt.to(flat.device) if self.xxt is not None else None
        self.tokens += flat.shape[0]
        # In slices of tokens, and the product accumulated in place: no temporary as large
        # as the batch's activations or as H (5632² floats for a Llama MLP's down_proj).
        for part in flat.split(_SLICE_TOKENS):
            self.sq_norm += part.pow(2).sum(0).double()
        if self.xxt is not None:
            self.xxt.addmm_(flat.t(), flat)

    @property
    def input_norm(self) -> torch.Tensor:
        """‖X_j‖₂ per input feature (in,)."""
        return self.sq_norm.sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n · X Xᵀ (in, in)."""
        return self._accumulated() * (2.0 / self.tokens)

    def take_hessian(self) -> torch.Tensor:
        """H, made from the accumulated X Xᵀ in place — no (in, in) copy; the accumulator
        has no Hessian afterwards."""
        h = self._accumulated()
        self.xxt = None
        return h.mul_(2.0 / self.tokens)

    def _accumulated(self) -> torch.Tensor:
        if self.xxt is None or self.tokens == 0:
            raise ValueError("no Hessian: accumulator built without it or fed no tokens")
        return self.xxt


def inverse_hessian_factor(
    hessian: torch.Tensor, dampening: float, *, overwrite: bool = False
) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = ``dampening`` · mean(diag H).

    Its rows drive the column-by-column OBS updates of SparseGPT (arXiv 2301.00774) and GPTQ
    (arXiv 2210.17323, Algorithm 1), replacing repeated inverse downdates.
    ``overwrite``: ``hessian`` (float32) is the caller's scratch copy, damped in place instead
    of copied — one (K, K) matrix less at the peak.
    """
    # At most two (K, K) matrices of its own alive at once (K = 5632 for a Llama MLP's
    # down_proj: 127 MiB each): every intermediate is dropped as soon as the next exists.
    h = hessian if overwrite and hessian.dtype == torch.float32 else hessian.float().clone()
    damp = dampening * torch.mean(torch.diag(h)).clamp_min(1e-8)
    h.diagonal().add_(damp)
    factor = torch.linalg.cholesky(h)
    del h
    inv = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inv, upper=True)


class TokenSample:
    """A uniform sample of at most ``limit`` rows (tokens) from a stream fed batch by batch.

    Bottom-k sampling: each token gets a fixed pseudo-random priority from its index in the
    stream, and the ``limit`` lowest are kept, in stream order. The sample depends only on the
    sequence of tokens, not on how they were batched — one padded batch of four sequences and
    the same four fed one at a time keep the same rows.
    """

    def __init__(self, limit: int, *, seed: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"TokenSample.limit must be >= 1, got {limit}")
        self.limit = limit
        self.seed = seed
        self.seen = 0
        self._index = torch.empty(0, dtype=torch.long)
        self._rows: torch.Tensor | None = None  # (kept, K)

    def add(self, rows: torch.Tensor) -> None:
        """``rows`` (n, K): the next n tokens of the stream."""
        index = torch.arange(self.seen, self.seen + rows.shape[0])
        self.seen += rows.shape[0]
        kept = rows if self._rows is None else torch.cat([self._rows, rows.to(self._rows)])
        index = torch.cat([self._index, index])
        if index.numel() > self.limit:
            pick = torch.topk(token_priority(index, self.seed), self.limit, largest=False).indices
            pick = pick.sort().values  # back to stream order
            kept, index = kept[pick], index[pick]
        self._rows, self._index = kept, index

    @property
    def rows(self) -> torch.Tensor:
        """The kept rows (kept, K), in stream order."""
        if self._rows is None:
            raise ValueError("TokenSample: no rows were added")
        return self._rows

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the kept rows by ``fn(rows)`` (e.g. the layer now reads x / s)."""
        self._rows = fn(self.rows)


def token_priority(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random int64 per stream index (the SplitMix64 finaliser)."""
    offset = (seed * 0x632BE59BD9B4E019 + 0x9E3779B97F4A7C15) % 2**64
    x = index.long() + (offset - 2**64 if offset >= 2**63 else offset)  # wraps like uint64
    x = (x ^ _ushr(x, 30)) * -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as int64
    x = (x ^ _ushr(x, 27)) * -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB as int64
    return x ^ _ushr(x, 31)


def _ushr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def stream_uniform(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed uniform draw in (0, 1) (float64) per stream index: random numbers tied to a
    token's place in the stream, so that batching does not change which token gets which."""
    bits = _ushr(token_priority(index, seed), 11)  # 53 random bits
    return (bits.double() + 0.5) / float(2**53)
