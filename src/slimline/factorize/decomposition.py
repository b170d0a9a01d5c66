"""A weight as a sum of rank-one terms, W = U · diag(s) · R, and what dropping terms costs.

The three matrix methods differ only in the transform T applied before the SVD: ``svd``
takes T = I, ``asvd`` a diagonal of activation magnitudes (arXiv 2312.05821), ``svd_llm`` the
Cholesky factor of X Xᵀ (arXiv 2403.07378). With W T = U Σ Vᵀ, the terms are U's columns,
Σ and the rows of R = Vᵀ T⁻¹, so W = U Σ R exactly, and keeping the first r terms is the
method's truncation. Everything after the SVD — factors, ranks by energy, the output error
of each truncation — is shared, here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Decomposition:
    """W (N, K) = ``left`` (N, m) · diag(``values`` (m,)) · ``right`` (m, K), values descending."""

    left: torch.Tensor
    values: torch.Tensor
    right: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first r terms as A = √s·R (r, K) and B = U·√s (N, r), so W_r = B A.

        Splitting √s over both factors keeps their ranges alike, which later rounding of
        either factor (rtn, gptq) prefers to one factor holding all the scale.
        """
        root = self.values[:rank].clamp_min(0).sqrt()
        return root[:, None] * self.right[:rank], self.left[:, :rank] * root[None, :]

    def reconstruct(self, rank: int) -> torch.Tensor:
        """W_r (N, K): the sum of the first ``rank`` terms."""
        first, second = self.factors(rank)
        return second @ first


def svd_of(weight: torch.Tensor) -> Decomposition:
    """The thin SVD of ``weight`` (N, K) as a Decomposition (computed in float64)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return Decomposition(u, s, vh)


def decompose_transformed(weight: torch.Tensor, transformed: torch.Tensor) -> Decomposition:
    """W = U Σ R from the SVD of W·T = U Σ Vᵀ (``transformed``, (N, K)), T invertible.

    R = Vᵀ T⁻¹ is computed as Σ⁻¹ Uᵀ W (equal, as Uᵀ W T = Σ Vᵀ): no T⁻¹ is formed, so a
    nearly singular T (a jittered X Xᵀ, a dead channel's tiny scale) does not blow the
    factors up — the first factor √σ_i·R_i = u_iᵀ W / √σ_i stays bounded by ‖W‖ / √σ_i.
    Terms with σ_i = 0 get R_i = 0; they add nothing to W.
    """
    w = weight.double()
    u, sigma, _ = torch.linalg.svd(transformed.double(), full_matrices=False)
    tiny = torch.finfo(torch.float64).tiny
    inverse = torch.where(sigma > tiny, 1.0 / sigma.clamp_min(tiny), torch.zeros_like(sigma))
    return Decomposition(u, sigma, inverse[:, None] * (u.t() @ w))


def truncation_errors(
    dec: Decomposition, hessian: torch.Tensor | None = None, gain: torch.Tensor | None = None
) -> torch.Tensor:
    """E (m + 1,): E[r] = Σ_n G_nn (ΔW_r A ΔW_rᵀ)_nn for ΔW_r = W − W_r, r = 0..m.

    A = ``hessian`` (K, K) is the layer's input second moment X Xᵀ / n and G = ``gain`` (N,)
    the output weights of :func:`slimline.quantize.mixed_sensitivity.output_gains` (None: I),
    the K-FAC output cost the mixed-precision allocator uses. With ΔW_r = Σ_{i≥r} s_i u_i r_iᵀ,
    E[r] = Σ_{i,j≥r} M_ij for M = (S UᵀGU S) ∘ (R A Rᵀ): one (m, m) matrix and its
    suffix sums give every rank at once.
    """
    us = dec.left.double() * dec.values.double()[None, :]  # (N, m)
    weighted = us if gain is None else us * gain.double().to(us.device)[:, None]
    right = dec.right.double()  # (m, K)
    a = right if hessian is None else right @ hessian.double().to(right.device)
    m = (us.t() @ weighted) * (a @ right.t())  # (m, m)
    suffix = m.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)  # suffix[r, c] = Σ_{i≥r, j≥c} M_ij
    tail = torch.diagonal(suffix).clamp_min(0)
    return torch.cat([tail, tail.new_zeros(1)]).cpu()
