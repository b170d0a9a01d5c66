"""The parity an export is held to: a W8A8 model's tolerance measured on the model itself
(``within_rounding``), and its lowering checked layer by layer (``check_lowering``)."""

from __future__ import annotations

import math

import pytest
import torch

import slimline as sl
from slimline.export.lowering import W8A8Graph, check_lowering
from slimline.export.parity import (
    ROUNDING_SPREAD,
    STRICT,
    Tolerance,
    compare,
    compare_batch,
    loosest,
    within_rounding,
)
from tests.export.test_onnx import _bert, _tokens


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def test_a_float_order_that_agrees_keeps_the_strict_tolerance() -> None:
    ref = torch.randn(2, 5, 8)
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long)}
    limit, seen = within_rounding(ref, ref.clone(), batch)
    assert limit == STRICT and seen.cosine == pytest.approx(1.0)
    # a user's looser tolerance is never tightened
    wide = Tolerance(atol=0.5, min_cosine=0.9)
    assert within_rounding(ref, ref.clone(), batch, wide)[0] == wide


def test_a_divergent_float_order_loosens_by_the_spread_over_real_tokens_only() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 6, 16, generator=gen) * 3
    other = ref + 0.05 * torch.randn(2, 6, 16, generator=gen)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    other[1, :2] = 1e3  # padded positions: arbitrary, never read
    batch = {"input_ids": torch.ones(2, 6, dtype=torch.long), "attention_mask": mask}
    limit, _ = within_rounding(ref, other, batch)
    real = mask.bool()
    cos = _cosine(ref[real], other[real])
    diff = float((ref[real] - other[real]).abs().max())
    assert limit.min_cosine == pytest.approx(1 - ROUNDING_SPREAD * (1 - cos))
    assert limit.atol == pytest.approx(ROUNDING_SPREAD * diff / float(ref[real].abs().max()))
    # an export as far off as the reordering passes; one 3x as far fails
    assert compare(ref[real], other[real], [2, 6], limit).passed
    worse = ref + 3 * (other - ref)
    assert not compare(ref[real], worse[real], [2, 6], limit).passed
    assert loosest([STRICT, limit]) == Tolerance(limit.atol, limit.min_cosine)
    assert math.isfinite(limit.min_cosine) and limit.min_cosine < STRICT.min_cosine


def test_each_w8a8_layer_lowers_to_its_kernel_and_a_faulty_lowering_is_named(monkeypatch) -> None:
    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    model = sl.compress(_bert(), {"steps": [{"method": "int8_dynamic"}]},
                        calibration=calibration).model.eval()
    batch = _tokens(3, 11, seed=4)
    check_lowering(model, lambda: model(**batch))  # within float32 rounding: no error
    # a lowering without the activation grid (fp32 activations) is a fault, named by layer
    monkeypatch.setattr(W8A8Graph, "forward", lambda self, x: torch.nn.functional.linear(
        x.float(), self.qweight.float() * self.weight_scale, self.bias))
    with pytest.raises(ValueError, match=r"W8A8 layer '.*query' .* differs from its kernel"):
        check_lowering(model, lambda: model(**batch))


def test_w8a8_export_records_its_rounding_tolerance_and_stays_strict_on_one_token(
        tmp_path) -> None:
    pytest.importorskip("openvino")
    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    model = sl.compress(_bert(), {"steps": [{"method": "int8_dynamic"}]},
                        calibration=calibration).model.eval()
    report = sl.export(model, tmp_path / "out", format="openvino", example=_tokens(2, 12))
    rounding = report.details["w8a8_rounding"]
    assert [r["shape"] for r in rounding] == [p.shape for p in report.parity]
    one_token = next(r for r in rounding if r["shape"][1] == 1)
    assert one_token["min_cosine"] == STRICT.min_cosine and one_token["atol_of_scale"] == STRICT.atol
    for r in rounding:
        assert r["min_cosine"] == pytest.approx(
            min(STRICT.min_cosine, 1 - ROUNDING_SPREAD * (1 - r["torch_lowered_cosine"])))
    assert report.passed


def test_jittered_moves_the_rounded_inputs_reproducibly_and_only_inside_the_block() -> None:
    from slimline.export.lowering import jittered, lowered

    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    model = sl.compress(_bert(), {"steps": [{"method": "int8_dynamic"}]},
                        calibration=calibration).model.eval()
    batch = _tokens(4, 14, seed=3)
    with torch.no_grad(), lowered(model):
        plain = model(**batch).last_hidden_state
        with jittered(model, 1e-2):  # large enough to flip roundings on a tiny model
            first = model(**batch).last_hidden_state
        with jittered(model, 1e-2):
            again = model(**batch).last_hidden_state
        after = model(**batch).last_hidden_state
        graphs = [m for m in model.modules() if isinstance(m, W8A8Graph)]
    assert torch.equal(first, again) and torch.equal(plain, after)
    assert not torch.equal(first, plain)
    assert len(graphs) == 12 and all(m.noise is None and m.jitter == 0 for m in graphs)


def test_a_w8a8_tolerance_is_the_loosest_of_several_modelled_runtimes(monkeypatch) -> None:
    import functools

    from slimline.export import lowering
    from slimline.export.graph import GraphForward, references
    from slimline.export.parity import parity_examples

    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    model = sl.compress(_bert(), {"steps": [{"method": "int8_dynamic"}]},
                        calibration=calibration).model.eval()
    graph = GraphForward(model, _tokens(4, 14, seed=3)).eval()
    examples, outputs = references(graph, parity_examples(_tokens(4, 14, seed=3)))
    # a jitter large enough to flip roundings on a tiny model, so that the draws differ
    monkeypatch.setattr(lowering, "jittered", functools.partial(lowering.jittered, jitter=1e-2))
    with lowering.lowered(model, integer=True):
        tols, rounding = lowering.rounding_tolerances(graph, examples, outputs, STRICT, lowered=True)
        by_draw = []
        for draw in range(lowering.JITTER_DRAWS):
            with lowering.jittered(model, draw=draw):
                by_draw.append(references(graph, examples)[1])
    first = examples[0]
    limits = [within_rounding(outputs[0], d[0], first)[0] for d in by_draw]
    assert len(set(limits)) > 1  # each draw is another runtime
    assert tols[0] == loosest(limits)
    seen = [compare_batch(outputs[0], d[0], first) for d in by_draw]
    assert rounding[0]["torch_lowered_cosine"] == min(c.cosine for c in seen)
    assert rounding[0]["torch_lowered_max_abs_diff"] == max(c.max_abs_diff for c in seen)
