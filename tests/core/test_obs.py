"""The shared OBS sweep against the textbook column-by-column form with inverse downdates."""

from __future__ import annotations

import pytest
import torch

from slimline.core.obs import masked_problem, obs_sweep
from slimline.core.statistics import inverse_hessian_factor


def _problem(out: int = 10, inp: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, inp, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, inp)
    return torch.randn(out, inp, generator=g, dtype=torch.float64), 2 / 200 * x.t() @ x


def _textbook(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """OBS (GPTQ arXiv 2210.17323, Eq. 2–3): decide column i, spread its error through the
    inverse Hessian of the columns left, then eliminate i from that inverse."""
    w = w.clone()
    hinv = torch.linalg.inv(h)
    for i in range(w.shape[1]):
        new = torch.round(w[:, i] * 2) / 2
        err = (w[:, i] - new) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        w[:, i] = new
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return w


@pytest.mark.parametrize("block_size", [1, 5, 23, 64])
def test_sweep_equals_textbook_obs_for_every_block_size(block_size: int) -> None:
    w, h = _problem()
    hinv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # float64: no rounding flips
    decided: list[int] = []

    def decide(j: int, w_now: torch.Tensor) -> torch.Tensor:
        decided.append(j)
        return torch.round(w_now[:, j] * 2) / 2

    ours = obs_sweep(w, hinv, block_size, decide)
    assert decided == list(range(w.shape[1]))
    torch.testing.assert_close(ours, _textbook(w, h), rtol=0, atol=1e-9)
    assert torch.all(ours * 2 == torch.round(ours * 2))  # every column was set to its decision


def test_sweep_leaves_its_input_alone_and_masks_dead_inputs() -> None:
    w, h = _problem()
    h[4, :] = 0.0
    h[:, 4] = 0.0  # input 4 never active
    w32, h32 = masked_problem(w, h)
    assert torch.all(w32[:, 4] == 0) and h32[4, 4] == 1.0 and w[:, 4].abs().sum() > 0
    before = w32.clone()
    obs_sweep(w32, inverse_hessian_factor(h32, 0.01), 8, lambda j, cur: cur[:, j] * 0)
    assert torch.equal(w32, before)
    with pytest.raises(ValueError, match="block_size"):
        obs_sweep(w32, inverse_hessian_factor(h32, 0.01), 0, lambda j, cur: cur[:, j])


def test_an_ordered_problem_is_the_masked_problem_permuted() -> None:
    """``order`` permutes the weight's columns and H's rows and columns, masking included;
    the inputs are untouched, and ``overwrite`` factors the caller's copy to the same U."""
    w, h = _problem()
    h[4, :] = 0.0
    h[:, 4] = 0.0
    w_in, h_in = w.clone(), h.clone()
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(3))
    w32, h32 = masked_problem(w, h)
    wo, ho = masked_problem(w, h, order)
    torch.testing.assert_close(wo, w32[:, order], rtol=0, atol=0)
    torch.testing.assert_close(ho, h32[order][:, order], rtol=0, atol=0)
    assert torch.equal(w, w_in) and torch.equal(h, h_in)
    expected = inverse_hessian_factor(ho, 0.01)
    torch.testing.assert_close(inverse_hessian_factor(ho, 0.01, overwrite=True), expected)
