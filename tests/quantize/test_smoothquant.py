"""``smoothquant``: the smoothing maths, the W8A8 layer against exact integer arithmetic, and
the method on a model with real activation outliers (minilm)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimline as sl
from slimline.core.batches import forward, output_tensor
from slimline.models import load_builtin
from slimline.quantize import fallback
from slimline.quantize import kernels_int8 as kernels
from slimline.quantize.smoothquant import (
    ActivationStats,
    SmoothQuantConfig,
    choose_smoothing,
    simulated_output,
    smooth_layer,
    smoothed_range,
    smoothing_multiplier,
    static_input_qparams,
)
from slimline.quantize.w8a8 import SmoothQuantLinear


def _outlier_activations(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """LayerNorm-like activations whose first channels are 40× larger, as in transformers."""
    g = torch.Generator().manual_seed(seed)
    x = F.layer_norm(torch.randn(rows, width, generator=g), (width,))
    x[:, :4] *= 40.0
    return x


def _linear(k: int, n: int, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n)
    return layer


def _stats(x: torch.Tensor, keep_rows: int = 0) -> ActivationStats:
    stats = ActivationStats(x.shape[-1], keep_rows=keep_rows)
    stats.add_batch(x)
    return stats


def test_smoothing_multiplier_is_the_papers_formula() -> None:
    x_max = torch.tensor([8.0, 1.0, 0.0, 2.0])
    w_max = torch.tensor([0.5, 2.0, 1.0, 0.0])
    m = smoothing_multiplier(x_max, w_max, alpha=0.5)
    s = torch.tensor([(8.0**0.5) / (0.5**0.5), (1.0**0.5) / (2.0**0.5), 1.0, 1.0])
    torch.testing.assert_close(m, 1.0 / s)
    # α = 1 moves the whole activation range into the weights: x · m is at most 1 per channel
    m1 = smoothing_multiplier(x_max, w_max, alpha=1.0)
    torch.testing.assert_close((x_max * m1)[[0, 1]], torch.ones(2))


@pytest.mark.parametrize("bits", [7, 8])
def test_static_qparams_cover_the_range_with_zero_exact(bits: int) -> None:
    scale, zero = static_input_qparams(-3.0, 5.0, bits)
    assert scale == pytest.approx(8.0 / (2**bits - 1))  # every level of the grid spans the range
    x = torch.tensor([-3.0, 0.0, 5.0, 1.234])
    codes = kernels.quantize_static(x, torch.full((4,), 1.0 / scale), zero, bits)
    back = (codes.float() - zero) * scale
    assert (back - x).abs().max() <= scale / 2 + 1e-6
    assert back[1] == 0.0
    # saturation, not wrap-around, outside the calibrated range
    far = torch.tensor([-100.0, 100.0])
    assert kernels.quantize_static(far, torch.full((2,), 1 / scale), zero, bits).tolist() == [
        0, 2**bits - 1]


def test_smoothed_range_matches_direct_min_max() -> None:
    x = _outlier_activations(64, 32)
    stats = _stats(x)
    m = torch.rand(32) + 0.1
    lo, hi = smoothed_range(stats.lo, stats.hi, m)
    assert lo == pytest.approx(float((x * m).min()), rel=1e-6)
    assert hi == pytest.approx(float((x * m).max()), rel=1e-6)


@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("static", [False, True])
def test_layer_equals_exact_integer_reference(static: bool, bits: int) -> None:
    """On both grids, whichever kernel this CPU runs them on (8 bits without VNNI: two passes)."""
    x = _outlier_activations(40, 96).reshape(4, 10, 96)
    linear = _linear(96, 48)
    stats = _stats(x)
    m = smoothing_multiplier(stats.absmax, linear.weight.abs().amax(0), 0.5)
    lo, hi = smoothed_range(stats.lo, stats.hi, m)
    qparams = static_input_qparams(lo, hi, bits) if static else None
    layer = SmoothQuantLinear.from_smoothed(linear, m, qparams, activation_bits=bits)
    assert layer.activation_bits == bits
    # the reference: integer codes from the same quantizers, products summed in int64
    xs = x * m
    q = layer.qweight.long()
    if qparams is None:
        codes, s_x, z_x = kernels.quantize_per_token(xs, bits)
        acc = (codes.long() - z_x.long()) @ q.t()
        ref = acc.double() * s_x.double()
    else:
        s_x, z_x = qparams
        codes = kernels.quantize_static(xs, torch.full_like(m, 1.0 / s_x), z_x, bits)
        acc = (codes.long() - z_x) @ q.t()
        ref = acc.double() * s_x
    assert int(codes.max()) >= 2**bits - 2  # the outlier channels reach the top of the grid
    ref = (ref * layer.weight_scale.double() + linear.bias.double()).float()
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    # and the weight it stands for is the float weight, up to int8 rounding
    err = (layer.dequantized_weight() - linear.weight).abs()
    bound = layer.weight_scale[:, None] * m[None, :] / 2
    assert (err <= bound * (1 + 1e-4) + 1e-7).all()


@pytest.mark.parametrize("saturates", [True, False])
def test_calibrated_grid_is_the_one_this_cpu_runs_exactly(
    monkeypatch: pytest.MonkeyPatch, saturates: bool
) -> None:
    """Where 8-bit codes would saturate the int8 GEMM (forced here), the static grid is
    calibrated with 7 bits: the codes of the calibration data span [0, 127]."""
    monkeypatch.setattr(kernels, "onednn_saturates", lambda: saturates)
    bits = 7 if saturates else 8
    x = _outlier_activations(256, 64)
    layer, _ = smooth_layer(_linear(64, 32), _stats(x, keep_rows=256),
                            SmoothQuantConfig(alpha=0.5, activations="static"),
                            static=True)  # fmt: skip
    assert layer.activation_bits == bits and 0 <= int(layer.input_zero) < 2**bits
    scale, zero = float(layer.input_scale), int(layer.input_zero)
    codes = kernels.quantize_static(x * layer.smooth, layer.smooth.new_full((64,), 1 / scale),
                                    zero, bits)  # fmt: skip
    assert int(codes.max()) == 2**bits - 1
    assert int(codes.min()) <= 2 ** (bits - 3)  # a clipped range still spans most levels


def test_smoothing_beats_plain_w8a8_on_outlier_channels() -> None:
    x = _outlier_activations(256, 128)
    linear = _linear(128, 64)
    reference = x @ linear.weight.t()
    stats = _stats(x)
    w_max = linear.weight.abs().amax(0)
    plain = simulated_output(x, linear.weight, torch.ones(128), None)
    smooth = simulated_output(x, linear.weight, smoothing_multiplier(stats.absmax, w_max, 0.5),
                              None)  # fmt: skip
    err_plain = (plain - reference).square().mean()
    err_smooth = (smooth - reference).square().mean()
    assert err_smooth < 0.5 * err_plain


def test_alpha_search_picks_the_grid_minimum() -> None:
    x = _outlier_activations(128, 64, seed=3)
    linear = _linear(64, 32, seed=4)
    stats = _stats(x, keep_rows=128)
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    clips = (1.0, 0.8, 0.6)
    chosen = choose_smoothing(stats.sample(), linear.weight, stats, True, grid, clips)
    reference = x @ linear.weight.t()
    errors = {}
    for a in grid:  # the objective recomputed directly, over the full sample
        m = smoothing_multiplier(stats.absmax, linear.weight.abs().amax(0), a)
        for c in clips:
            qp = static_input_qparams(c * float((x * m).min()), c * float((x * m).max()))
            out = simulated_output(x, linear.weight, m, qp)
            errors[a, c] = float((out - reference).square().sum())
    assert chosen == min(errors, key=errors.__getitem__)


def test_activation_stats_reject_nan() -> None:
    x = torch.zeros(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        _stats(x)


@pytest.mark.parametrize(
    ("field", "value"), [("alpha", 1.5), ("alpha", -0.1), ("activations", "per-channel"),
                         ("min_cosine", 0.99)]  # min_cosine with the default dynamic activations
)
def test_bad_config_is_rejected(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SmoothQuantConfig.from_dict({field: value})


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2])
def test_min_cosine_out_of_range_is_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="min_cosine"):
        SmoothQuantConfig.from_dict({"activations": "static", "min_cosine": value})


def test_no_calibration_is_rejected_before_touching_the_model() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="calibration"):
        sl.compress(model, {"steps": [{"method": "smoothquant"}]})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@functools.cache
def _minilm():  # type: ignore[no-untyped-def]
    built = load_builtin("minilm")
    return built, built.batches("train", batch_size=16, limit=4), built.batches(
        "test", batch_size=16, limit=2
    )


def _cosine(model: nn.Module, reference: nn.Module, batches: list) -> float:  # type: ignore[type-arg]
    with torch.inference_mode():
        cos = [
            F.cosine_similarity(output_tensor(forward(model, b), b),
                                output_tensor(forward(reference, b), b), dim=-1)
            for b in batches
        ]  # fmt: skip
    return float(torch.cat(cos).mean())


def test_smoothquant_beats_unsmoothed_int8_on_minilm() -> None:
    built, calib, test = _minilm()
    plain = sl.compress(built.model, {"steps": [{"method": "int8_dynamic"}]}).model
    smooth = sl.compress(built.model, {"steps": [{"method": "smoothquant"}]},
                         calibration=calib).model  # fmt: skip
    gap_plain = 1 - _cosine(plain, built.model, test)
    gap_smooth = 1 - _cosine(smooth, built.model, test)
    assert gap_smooth < gap_plain
    encoder = [m for n, m in smooth.named_modules()
               if n.startswith("encoder.") and n.endswith(("query", "key", "value", "dense"))]
    assert len(encoder) == 6 * 6 and all(isinstance(m, SmoothQuantLinear) for m in encoder)


def test_static_model_saves_and_loads_identically(tmp_path) -> None:  # type: ignore[no-untyped-def]
    built, calib, test = _minilm()
    model = sl.compress(built.model, {"steps": [{"method": "smoothquant", "activations": "static",
                                                 "alpha": 0.8}]},
                        calibration=calib[:2]).model  # fmt: skip
    sl.save(model, tmp_path / "sq")
    loaded = sl.load(tmp_path / "sq")
    batch = test[0]
    with torch.inference_mode():
        a = output_tensor(forward(model, batch), batch)
        b = output_tensor(forward(loaded, batch), batch)
    assert torch.equal(a, b)
    layer = loaded.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(layer, SmoothQuantLinear) and layer.static


@pytest.mark.parametrize(("static", "bits"), [(False, 7), (True, 7), (False, 8), (True, 8)])
def test_compiled_layer_matches_eager(static: bool, bits: int) -> None:
    x = _outlier_activations(24, 64).reshape(2, 12, 64)
    linear = _linear(64, 32)
    stats = _stats(x)
    m = smoothing_multiplier(stats.absmax, linear.weight.abs().amax(0), 0.5)
    lo, hi = smoothed_range(stats.lo, stats.hi, m)
    qparams = static_input_qparams(lo, hi, bits) if static else None
    layer = SmoothQuantLinear.from_smoothed(linear, m, qparams, activation_bits=bits)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-4)


def _padded_batches(n: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Right-padded token batches of varied lengths, as a user's text gives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, 17, (3,), generator=g)
        mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 128, (3, 16), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _sq_layers(model: nn.Module) -> dict[str, SmoothQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SmoothQuantLinear)}


def test_min_cosine_switches_the_fewest_layers_to_dynamic(tiny_llama: nn.Module) -> None:
    """Static everywhere misses the target on the held-out calibration batch, all dynamic
    meets it: some layers go dynamic, the model then meets it, and every layer left static
    is exactly the all-static model's (same ranges, fitted on the same batches)."""
    batches = _padded_batches(4)
    fit, check = batches[:3], batches[3:]  # the last quarter is held out
    step = {"method": "smoothquant", "activations": "static", "alpha": 0.5}
    reference = fallback.model_outputs(tiny_llama, check)
    static = sl.compress(tiny_llama, {"steps": [step]}, calibration=fit).model
    everything = sl.compress(tiny_llama, {"steps": [{**step, "min_cosine": 1.0}]},
                             calibration=batches).model  # fmt: skip
    assert all(not m.static for m in _sq_layers(everything).values())
    low = fallback.output_cosine(static, check, reference)
    high = fallback.output_cosine(everything, check, reference)
    assert low < high
    target = (low + high) / 2
    result = sl.compress(tiny_llama, {"steps": [{**step, "min_cosine": target}]},
                         calibration=batches)  # fmt: skip
    mixed = _sq_layers(result.model)
    dynamic = [n for n, m in mixed.items() if not m.static]
    assert 0 < len(dynamic) < len(mixed)
    assert fallback.output_cosine(result.model, check, reference) >= target
    assert f"{len(dynamic)} of {len(mixed)} layers with per-token dynamic" in str(result.steps)
    for name, layer in mixed.items():
        twin = _sq_layers(static if layer.static else everything)[name]
        for key, value in layer.state_dict().items():
            assert torch.equal(value, twin.state_dict()[key]), (name, key)


def test_min_cosine_model_saves_and_loads_identically(tiny_llama: nn.Module, tmp_path) -> None:  # type: ignore[no-untyped-def]
    batches = _padded_batches(4)
    model = sl.compress(tiny_llama, {"steps": [{"method": "smoothquant", "activations": "static",
                                                "min_cosine": 0.999999}]},
                        calibration=batches).model  # fmt: skip
    kinds = {n: m.static for n, m in _sq_layers(model).items()}
    assert not all(kinds.values())
    sl.save(model, tmp_path / "mixed")
    loaded = sl.load(tmp_path / "mixed")
    assert {n: m.static for n, m in _sq_layers(loaded).items()} == kinds
    with torch.inference_mode():
        for b in batches:
            assert torch.equal(output_tensor(forward(model, b), b),
                               output_tensor(forward(loaded, b), b))
