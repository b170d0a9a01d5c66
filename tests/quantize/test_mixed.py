"""Mixed precision: the allocator against brute force, the sensitivity maths against its
definition, budgets in the bytes actually stored, and rtn / gptq / hqq end to end."""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import slimline as sl
from slimline.quantize.hqq import HqqConfig, hqq_quantize_weight
from slimline.quantize.mixed import allocate_bits
from slimline.quantize.mixed_sensitivity import output_error, output_gains
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import QuantLinear

# ---------------------------------------------------------------- allocation (pure maths)


def _brute_force(errors, sizes, budget) -> float:
    """Least total error over every allocation that fits (inf when none does)."""
    names = list(errors)
    best = math.inf
    for combo in itertools.product(*(sorted(errors[n]) for n in names)):
        if sum(sizes[n][b] for n, b in zip(names, combo, strict=True)) <= budget:
            best = min(best, sum(errors[n][b] for n, b in zip(names, combo, strict=True)))
    return best


def _instance(seed: int, scale: int = 1, layers: int = 6, choices=(3, 4, 8)):
    """Layers of random widths: error ~ c·4^-b (noisy), size = numel·b + scale overhead."""
    g = torch.Generator().manual_seed(seed)
    errors, sizes = {}, {}
    for i in range(layers):
        numel = int(torch.randint(20, 200, (), generator=g))
        overhead = int(torch.randint(1, 30, (), generator=g))
        c = float(torch.rand((), generator=g)) * 10 + 0.1
        errors[f"l{i}"] = {b: c * 4.0**-b * (0.5 + float(torch.rand((), generator=g)))
                           for b in choices}  # fmt: skip
        sizes[f"l{i}"] = {b: (numel * b + overhead) * scale for b in choices}
    cheapest = sum(min(s.values()) for s in sizes.values())
    dearest = sum(max(s.values()) for s in sizes.values())
    budget = cheapest + int(float(torch.rand((), generator=g)) * (dearest - cheapest))
    return errors, sizes, budget


def _total(errors, sizes, widths):
    return sum(errors[n][b] for n, b in widths.items()), sum(sizes[n][b] for n, b in widths.items())


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_the_brute_force_optimum(seed: int) -> None:
    errors, sizes, budget = _instance(seed)
    widths = allocate_bits(errors, sizes, budget)
    err, size = _total(errors, sizes, widths)
    assert size <= budget
    assert err == pytest.approx(_brute_force(errors, sizes, budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_allocation_exact_on_a_shared_unit_even_when_the_grid_is_small(seed: int) -> None:
    # Sizes share 4096 (as real layers' bit counts share powers of two): 40 states suffice
    errors, sizes, budget = _instance(seed, scale=4096)
    widths = allocate_bits(errors, sizes, budget, max_cells=6 * (budget // 4096))
    err, size = _total(errors, sizes, widths)
    assert size <= budget
    assert err == pytest.approx(_brute_force(errors, sizes, budget), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_on_a_coarse_grid_keeps_its_documented_bound(seed: int) -> None:
    errors, sizes, budget = _instance(seed)
    assert math.gcd(*(s for layer in sizes.values() for s in layer.values())) == 1
    states = 60  # max_cells / layers: sizes are rounded up to units of ceil(budget / 60) bits
    unit = math.ceil(budget / states)
    widths = allocate_bits(errors, sizes, budget, max_cells=6 * states)
    err, size = _total(errors, sizes, widths)
    assert size <= budget
    assert _brute_force(errors, sizes, budget) <= err + 1e-15
    assert err <= _brute_force(errors, sizes, budget - 6 * unit) + 1e-15


def test_allocation_rejects_a_budget_below_the_cheapest_layout() -> None:
    errors, sizes, _ = _instance(0)
    cheapest = sum(min(s.values()) for s in sizes.values())
    assert set(allocate_bits(errors, sizes, cheapest).values()) == {3}
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate_bits(errors, sizes, cheapest - 1)
    with pytest.raises(ValueError, match="same widths"):
        allocate_bits(errors, {**sizes, "l0": {3: 1, 4: 2}}, 10**6)


# ---------------------------------------------------------------- sensitivity maths


def test_output_error_is_the_gain_weighted_output_error_over_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) * torch.linspace(0.1, 3.0, 24)  # (T, K)
    delta = torch.randn(10, 24, generator=g) * 0.01  # (N, K)
    gain = torch.rand(10, generator=g)  # (N,)
    per_token = (x @ delta.t()).pow(2)  # (T, N): the output error of every token and feature
    reference = float((per_token * gain).sum(dim=1).mean())
    a = x.t() @ x / x.shape[0]
    assert output_error(delta, a, gain) == pytest.approx(reference, rel=1e-5)
    assert output_error(delta, a) == pytest.approx(float(per_token.sum(1).mean()), rel=1e-5)
    assert output_error(delta, None) == pytest.approx(float(delta.pow(2).sum()), rel=1e-6)


class _TwoLayer(nn.Module):
    def __init__(self, logits: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 5)
        self.logits = logits

    def forward(self, x: torch.Tensor):
        out = self.fc2(torch.tanh(self.fc1(x)))
        return {"logits": out} if self.logits else out


def test_output_gains_are_the_gauss_newton_diagonal() -> None:
    model = _TwoLayer(logits=False)
    x = torch.randn(4000, 6)
    gains = output_gains(model, {"fc1": model.fc1}, [x[:2000], x[2000:]])["fc1"]
    # Reference: E‖Δout‖² = Σ_o (J δy)_o², so G_nn = mean over tokens of Σ_o J_on² (J = ∂out/∂y)
    h = torch.tanh(model.fc1(x)).detach()
    jac = model.fc2.weight.detach() * (1 - h.pow(2)).unsqueeze(1)  # (T, out, N)
    expected = jac.pow(2).sum(dim=1).mean(dim=0)
    torch.testing.assert_close(gains, expected, rtol=0.15, atol=0)  # 4000 samples: ~3% noise
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_output_gains_on_logits_are_the_fisher_diagonal() -> None:
    model = _TwoLayer(logits=True)
    x = torch.randn(4000, 6)
    gains = output_gains(model, {"fc2": model.fc2}, [x])["fc2"]
    # At the logits the Fisher is diag(p) − ppᵀ: its diagonal p(1 − p), averaged over tokens
    p = model(x)["logits"].detach().softmax(-1)
    torch.testing.assert_close(gains, (p * (1 - p)).mean(0), rtol=0.15, atol=0)


# ---------------------------------------------------------------- end to end


class _Twins(nn.Module):
    """Two same-shaped layers side by side, each reading half of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x[:, :64]), self.b(x[:, 64:])], dim=-1)


# 32×64 at 3 bits + fp16 scales per 32 = 3.5 bits/weight, at 8 bits 8.5: 6.0 buys one at 8.
_TWINS = {"method": "rtn", "group_size": 32, "bit_choices": [3, 8], "average_bits": 6.0,
          "targets": {"include": ["a", "b"]}}  # fmt: skip


@pytest.mark.parametrize("loud", ["a", "b"])
def test_the_layer_with_the_larger_inputs_gets_the_bits(loud: str) -> None:
    model = _Twins()
    g = torch.Generator().manual_seed(3)
    scale = torch.ones(128)
    scale[slice(0, 64) if loud == "a" else slice(64, 128)] = 10.0  # the loud layer's inputs
    calibration = [torch.randn(16, 128, generator=g) * scale for _ in range(4)]
    result = sl.compress(model, {"steps": [_TWINS]}, calibration=calibration)
    bits = {n: result.model.get_submodule(n).bits for n in ("a", "b")}
    assert bits == {loud: 8, ("b" if loud == "a" else "a"): 3}


def test_without_data_the_layer_with_the_larger_weight_error_gets_the_bits() -> None:
    model = _Twins()
    with torch.no_grad():
        model.b.weight.mul_(10.0)  # ten times the weights: a hundred times ‖ΔW‖²
    result = sl.compress(model, {"steps": [_TWINS]})
    assert (result.model.a.bits, result.model.b.bits) == (3, 8)
    assert "no data" in result.steps[0].notes[0]


def _quantized(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("method", ["rtn", "gptq", "hqq"])
def test_budget_holds_in_the_saved_bytes_and_the_model_round_trips(
    method: str, tiny_llama, token_batches, tmp_path
) -> None:
    budget = 3.8
    step = {"method": method, "group_size": 32, "average_bits": budget}
    recipe = sl.Recipe.from_dict({"steps": [step]})
    assert sl.Recipe.from_dict(recipe.to_dict()) == recipe
    result = sl.compress(tiny_llama, recipe, calibration=token_batches)
    layers = _quantized(result.model)
    assert len(layers) == 14 and len({m.bits for m in layers.values()}) > 1
    sl.save(result.model, tmp_path / "ck")
    saved = load_file(str(tmp_path / "ck" / "model.safetensors"))
    stored = sum(saved[f"{n}.{t}"].numel() * saved[f"{n}.{t}"].element_size() * 8
                 for n in layers for t in ("qweight", "scales", "zeros") if f"{n}.{t}" in saved)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    assert stored <= budget * weights
    # The smallest step of any layer here (k_proj, 32×64, one bit more) is 0.03 bits/weight:
    # the allocator leaves less than a few such steps unspent.
    assert stored >= (budget - 0.1) * weights
    counts = Counter(m.bits for m in layers.values())
    assert ", ".join(f"{b}b×{counts[b]}" for b in sorted(counts)) in result.steps[0].notes[0]
    assert f"{stored / weights:.3f} stored bits/weight" in result.steps[0].notes[0]
    loaded = sl.load(tmp_path / "ck")
    assert {n: m.bits for n, m in _quantized(loaded).items()} == {
        n: m.bits for n, m in layers.items()
    }
    batch = token_batches[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, result.model(**batch).logits,
                                   rtol=0, atol=0)  # fmt: skip


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_each_layer_is_the_methods_own_quantization_at_its_width(method: str, tiny_llama) -> None:
    step = {"method": method, "group_size": 32, "average_bits": 4.5}
    layers = _quantized(sl.compress(tiny_llama, {"steps": [step]}).model)
    for name, layer in layers.items():
        weight = tiny_llama.get_submodule(name).weight.detach()
        if method == "rtn":
            q, scales, _ = quantize_groups(weight, layer.bits, 32, symmetric=True)
        else:
            q, scales, _ = hqq_quantize_weight(weight, HqqConfig(bits=layer.bits, group_size=32))
        assert torch.equal(layer.codes(), q) and torch.equal(layer.scales, scales), name


class _ResidualMLP(nn.Module):
    """Six residual layers, two with heavy-tailed (outlier) weights: sensitivities differ."""

    def __init__(self, width: int = 64, depth: int = 6, heavy: tuple[int, ...] = (1, 4)) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 8)
        with torch.no_grad():
            for i in heavy:
                w = torch.distributions.StudentT(1.5).sample((width, width)) * 0.05
                self.blocks[i].weight.copy_(w.clamp(-2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.blocks:
            x = x + fc(F.gelu(x))
        return self.head(x)


def _stored_per_weight(model: nn.Module) -> float:
    layers = _quantized(model).values()
    stored = sum(8 * sum(t.numel() * t.element_size() for k, t in m.state_dict().items()
                         if k != "bias") for m in layers)  # fmt: skip
    return stored / sum(m.in_features * m.out_features for m in layers)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize(("bits", "choices"), [(3, [2, 3, 4, 8]), (4, [3, 4, 8])])
def test_mixed_beats_uniform_at_the_same_stored_size(method: str, bits: int, choices) -> None:
    # Fair: same quantizer, groups and calibration; the mixed budget is the uniform model's
    # realised size; errors on held-out inputs against the float model.
    model = _ResidualMLP().eval()
    g = torch.Generator().manual_seed(100)
    calibration = [torch.randn(32, 64, generator=g) for _ in range(8)]
    held_out = torch.randn(256, 64, generator=g)
    base = {"method": method, "group_size": 32}
    uniform = sl.compress(model, {"steps": [{**base, "bits": bits}]}, calibration=calibration)
    size = _stored_per_weight(uniform.model)
    mixed_step = {**base, "average_bits": size, "bit_choices": choices}
    mixed = sl.compress(model, {"steps": [mixed_step]}, calibration=calibration)
    assert _stored_per_weight(mixed.model) <= size
    assert len({m.bits for m in _quantized(mixed.model).values()}) > 1
    with torch.no_grad():
        reference = model(held_out)
        err_uniform = float((uniform.model(held_out) - reference).pow(2).mean())
        err_mixed = float((mixed.model(held_out) - reference).pow(2).mean())
    assert err_mixed < err_uniform


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("step", "field"),
    [({"method": "rtn", "average_bits": 2.5}, "rtn.average_bits"),  # below 3 + 16/128
     ({"method": "rtn", "average_bits": 8.5}, "rtn.average_bits"),  # above 8 + 16/128
     ({"method": "rtn", "average_bits": 3.5, "bits": 3}, "rtn.bits"),
     ({"method": "rtn", "bit_choices": []}, "rtn.bit_choices"),
     ({"method": "rtn", "bit_choices": [1, 4]}, "rtn.bit_choices"),
     ({"method": "rtn", "bit_choices": [4, 9]}, "rtn.bit_choices"),
     ({"method": "rtn", "bit_choices": [4, 4]}, "rtn.bit_choices"),
     ({"method": "rtn", "bit_choices": "3,4"}, "rtn.bit_choices"),
     ({"method": "gptq", "average_bits": 3.0}, "gptq.average_bits"),
     ({"method": "hqq", "average_bits": 3.15}, "hqq.average_bits"),  # asymmetric: 3 + 24/128
     # awq takes the grid without the mixed-precision fields: an unknown field, named
     ({"method": "awq", "average_bits": 4.0}, "awq: unknown field(s) average_bits")],
)  # fmt: skip
def test_bad_budgets_raise_before_the_model_is_touched(step: dict, field: str, tiny_mlp) -> None:
    before = copy.deepcopy(tiny_mlp.state_dict())
    with pytest.raises((ValueError, TypeError), match=re.escape(field)):
        sl.compress(tiny_mlp, {"steps": [step]}, calibration=[torch.randn(4, 32)], inplace=True)
    assert isinstance(tiny_mlp.fc1, nn.Linear)
    for name, tensor in tiny_mlp.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_a_budget_the_layers_cannot_meet_raises_before_touching(tiny_mlp) -> None:
    # One scale per row: 3 bits + 16/K bits nominally fits 3.1, but fc1 has K = 32 (3.5 bits)
    before = copy.deepcopy(tiny_mlp.state_dict())
    step = {"method": "rtn", "group_size": None, "average_bits": 3.1, "bit_choices": [3, 4]}
    with pytest.raises(ValueError, match=r"rtn\.average_bits: 3.1 is below the 3\.3"):
        sl.compress(tiny_mlp, {"steps": [step]}, inplace=True)
    assert isinstance(tiny_mlp.fc1, nn.Linear) and isinstance(tiny_mlp.fc2, nn.Linear)
    for name, tensor in tiny_mlp.state_dict().items():
        assert torch.equal(tensor, before[name])
