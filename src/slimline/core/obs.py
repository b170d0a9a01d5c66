"""The column-by-column Optimal Brain Surgeon sweep shared by GPTQ and SparseGPT.

Both methods solve the layer-wise problem ``min ‖W X − Ŵ X‖²`` one input column at a time:
column ``j`` is set to a value the method decides (a column on the quantization grid for GPTQ,
arXiv 2210.17323; the column with a mask applied for SparseGPT, arXiv 2301.00774), and its
error is spread over the columns not yet decided through the row ``j`` of the upper Cholesky
factor U of H⁻¹ (:func:`~slimline.core.statistics.inverse_hessian_factor`), which replaces the
repeated inverse downdates of OBS. Updates are applied lazily, ``block_size`` columns at a
time (GPTQ §4, step 2): within a block column by column, to the later blocks once per block —
the same result as the plain column-by-column form, with far fewer memory passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# ``decide(j, w) -> column``: the value (N,) that column ``j`` of the working weight ``w``
# (N, K) takes; ``decide`` reads ``w``, never writes it. Columns before ``j`` are final; ``j``
# and the rest of its block carry every update so far; columns past the block lack this
# block's lazy update (as in the reference implementations, which choose GPTQ's group grids
# and SparseGPT's masks on such weights).
Decide = Callable[[int, torch.Tensor], torch.Tensor]


def masked_problem(
    weight: torch.Tensor, hessian: torch.Tensor, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of ``weight`` (N, K) and H (K, K), inputs never active made harmless;
    with ``order`` (K,), the weight's columns and H's rows and columns in that order.

    A zero diagonal entry of H is an input that was always 0 on the calibration data: its
    weights cannot change the output, so they are zeroed and H gets a unit diagonal there,
    which keeps it invertible. Each input is copied once (H of a Llama MLP's down_proj is
    5632² floats, 127 MiB).
    """
    dead = torch.diag(hessian) == 0
    if order is None:
        w = weight.detach().to(torch.float32, copy=True)
        h = hessian.to(torch.float32, copy=True)
    else:
        w = weight.detach().float()[:, order]
        h = hessian.float()[order.unsqueeze(1), order]
        dead = dead[order]
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def obs_sweep(
    weight: torch.Tensor, hinv: torch.Tensor, block_size: int, decide: Decide
) -> torch.Tensor:
    """The weight (N, K) after every column was decided left to right, errors compensated.

    ``hinv`` (K, K) is the upper Cholesky factor of H⁻¹; ``weight`` itself is not changed.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be ≥ 1, got {block_size}")
    # Worked on transposed, (K, N): a column of the weight is a contiguous row, so the
    # column-at-a-time reads and rank-1 updates stream memory instead of striding across N
    # rows (on CPU the strided form spent most of the sweep in cache misses).
    wt = weight.t().contiguous()
    w = wt.t()  # the (N, K) view ``decide`` reads
    k = wt.shape[0]
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block, hinv_block = wt[start:end], hinv[start:end, start:end]  # views
        errors = torch.zeros_like(block)  # (b, N)
        for i in range(end - start):
            col = block[i]
            new = decide(start + i, w).clone()  # not a view of the column it replaces
            err = (col - new) / hinv_block[i, i]  # (N,)
            block[i:] -= hinv_block[i, i:].unsqueeze(1) * err.unsqueeze(0)
            block[i] = new
            errors[i] = err
        wt[end:] -= hinv[start:end, end:].t() @ errors
    return w.contiguous()
