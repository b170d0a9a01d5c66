"""``tucker`` with ``allocation: sensitivity``: the per-layout output cost against the conv
itself, the budget of the uniform choice kept, and a CNN whose convs differ in
compressibility gains over uniform ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.factorize.layers import TuckerConv2d
from slimline.factorize.tucker import tucker2, tucker_params
from slimline.factorize.tucker_allocate import ConvPatchStats, tucker_error


@pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_weighted_error_is_the_mean_squared_output_change(
    stride: int, padding: int, dilation: int
) -> None:
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(20, 5, 9, 9, generator=g, dtype=torch.float64)
    stats = ConvPatchStats(conv)
    stats.add_batch(x[:12])
    stats.add_batch(x[12:])
    w = conv.weight.detach()
    u_out, core, u_in = tucker2(w, 3, 2, iterations=2)
    rebuilt = torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in)
    # The reference runs the convolutions: no im2col involved.
    def out(weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, weight, None, stride, padding, dilation)  # (B, C_out, H', W')

    change = (out(w) - out(rebuilt)).pow(2)  # (B, C_out, H', W')
    positions = change.shape[0] * change.shape[2] * change.shape[3]
    assert stats.tokens == positions
    got = tucker_error(w, (3, 2), 2, stats.second_moment, None)
    assert got == pytest.approx(float(change.sum()) / positions, rel=1e-5)
    gain = torch.rand(7, generator=g, dtype=torch.float64)
    weighted = float((change.sum(dim=(0, 2, 3)) * gain).sum()) / positions
    assert tucker_error(w, (3, 2), 2, stats.second_moment, gain) == pytest.approx(weighted, rel=1e-5)


class TwoConvs(nn.Module):
    """conv1 is nearly of Tucker ranks (2, 2) (cheap to decompose), conv2 is full rank."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(12, 12, 3, padding=1), nn.Conv2d(12, 12, 3, padding=1)
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            core = torch.randn(2, 2, 3, 3, generator=g)
            u_out, u_in = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)
            low = torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in) / 4
            self.conv1.weight.copy_(low + 0.01 * torch.randn(low.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.tanh(self.conv1(x)))  # (B, 12, H, W)
        return self.head(h.mean(dim=(2, 3)))


def _kernel_weights(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("data", [False, True])
def test_allocation_beats_uniform_ranks_at_the_same_size(data: bool) -> None:
    model = TwoConvs().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, 12, 6, 6, generator=g) for _ in range(2)]
    x = torch.cat(batches)

    def run(allocation: str) -> tuple[nn.Module, float, list[str]]:
        step = {"method": "tucker", "ratio": 0.4, "allocation": allocation, "iterations": 1}
        result = sl.compress(model, {"steps": [step]}, calibration=batches if data else None)
        out = result.model
        with torch.no_grad():  # the error inside the model: the head averages much of it away
            error = float((out.conv2(torch.tanh(out.conv1(x)))
                           - model.conv2(torch.tanh(model.conv1(x)))).pow(2).mean())
        return out, error, result.steps[0].notes

    uniform, uniform_error, _ = run("uniform")
    allocated, allocated_error, notes = run("sensitivity")
    assert _kernel_weights(allocated) <= _kernel_weights(uniform) < _kernel_weights(model)
    assert isinstance(allocated.conv1, TuckerConv2d) and isinstance(uniform.conv1, TuckerConv2d)
    assert allocated.conv1.ranks < uniform.conv1.ranks  # the cheap conv gives weights away
    assert allocated_error < uniform_error
    expected = "K-FAC output cost" if data else "‖ΔW‖²"
    assert any("allocated ranks" in n and expected in n for n in notes)


def test_allocated_budget_is_what_uniform_vbmf_ranks_spend() -> None:
    model = TwoConvs().eval()
    step = {"method": "tucker", "rank": "vbmf", "iterations": 1}
    uniform = sl.compress(model, {"steps": [step]}).model
    allocated = sl.compress(model, {"steps": [{**step, "allocation": "sensitivity"}]}).model
    spent = _kernel_weights(uniform)
    assert _kernel_weights(allocated) <= spent
    for name in ("conv1", "conv2"):  # what each layout stores, as the note counts it
        layer = allocated.get_submodule(name)
        if isinstance(layer, TuckerConv2d):
            r_in, r_out = layer.ranks
            assert sum(c.weight.numel() for c in (layer.first, layer.core, layer.last)) \
                == tucker_params((12, 12, 3, 3), r_out, r_in)


def test_allocation_is_validated() -> None:
    with pytest.raises(ValueError, match=r"tucker\.allocation"):
        sl.Recipe.from_dict({"steps": [{"method": "tucker", "allocation": "greedy"}]})
