"""``compile`` with ``backend: onnxruntime | openvino``: the same answers as the eager model, in
the eager output's type, from a graph the runtime runs; refusals before the model changes."""

from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.compile.runtime import RuntimeCall
from slimline.core.batches import forward


def _batch(rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, :2] = 0  # left-padded: position_ids counted over real tokens, as forward() does
    return {"input_ids": torch.randint(0, 128, (rows, length), generator=g),
            "attention_mask": mask}


def _real_diff(a: torch.Tensor, b: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    real = batch["attention_mask"].bool()
    return float((a[real] - b[real]).abs().max())


def test_onnxruntime_backend_matches_eager_and_saves(tmp_path, tiny_llama) -> None:
    pytest.importorskip("onnxruntime")
    model = sl.compress(tiny_llama, {"steps": [{"method": "compile",
                                                "backend": "onnxruntime"}]}).model
    call = model._compiled_call_impl
    assert isinstance(call, RuntimeCall)
    for batch in (_batch(2, 12, 1), _batch(3, 5, 2)):  # one graph: dynamic batch and sequence
        with torch.no_grad():
            out, ref = forward(model, batch), forward(tiny_llama, batch)
        assert type(out) is type(ref)
        assert _real_diff(out.logits, ref.logits, batch) < 1e-4
    assert len(call.graphs) == 1
    sl.save(model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    assert isinstance(loaded._compiled_call_impl, RuntimeCall)  # set up again on load
    batch = _batch(1, 7, 3)
    with torch.no_grad():
        assert _real_diff(loaded(**batch).logits, tiny_llama(**batch).logits, batch) < 1e-4


def test_training_mode_and_cache_steps_run_eager(tiny_llama) -> None:
    pytest.importorskip("onnxruntime")
    model = sl.compress(tiny_llama, {"steps": [{"method": "compile",
                                                "backend": "onnxruntime"}]}).model
    batch = _batch(2, 6, 4)
    out = model.train()(**batch)
    assert out.logits.requires_grad  # the eager forward, which autograd can train
    with torch.no_grad():
        cached = model.eval()(**batch, use_cache=True)
    assert cached.past_key_values is not None  # a cache step: eager, with its cache
    assert model._compiled_call_impl.graphs == {}


def test_openvino_backend_runs_w8a8_layers_in_int8(tiny_llama, token_batches) -> None:
    pytest.importorskip("openvino")
    quantized = sl.compress(tiny_llama, {"steps": [{"method": "int8_dynamic"}]}).model
    model = sl.compress(quantized, {"steps": [{"method": "compile", "backend": "openvino"}]}).model
    batch = _batch(2, 9, 5)
    with torch.no_grad():
        out, ref = model(**batch), forward(quantized, batch)  # its own int8 kernels
    assert _real_diff(out.logits, ref.logits, batch) < 1e-4
    (runner, _), = model._compiled_call_impl.graphs.values()
    assert runner.format == "openvino"


def test_onnxruntime_backend_runs_w8a8_layers_as_integer_gemms(tiny_llama) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    quantized = sl.compress(tiny_llama, {"steps": [{"method": "int8_dynamic"}]}).model
    model = sl.compress(quantized, {"steps": [{"method": "compile",
                                               "backend": "onnxruntime"}]}).model
    batch = _batch(2, 9, 5)
    with torch.no_grad():
        out, ref = model(**batch), forward(quantized, batch)  # its own int8 kernels
    assert _real_diff(out.logits, ref.logits, batch) < 1e-4
    (runner, _), = model._compiled_call_impl.graphs.values()
    ops = [n.op_type for n in onnx.load(str(runner.directory / "model.onnx")).graph.node]
    assert runner.format == "onnx" and ops.count("MatMulInteger") == 14  # 2 blocks × 7


def test_layers_onnxruntime_cannot_run_are_refused_before_compiling(tiny_llama) -> None:
    pytest.importorskip("onnxruntime")
    quantized = sl.compress(tiny_llama, {"steps": [{"method": "rtn", "bits": 4}]}).model
    recipe = {"steps": [{"method": "compile", "backend": "onnxruntime"}]}
    with pytest.raises(ValueError, match="compile.backend: onnxruntime cannot run.*QuantLinear"):
        sl.compress(quantized, recipe, inplace=True)
    assert quantized._compiled_call_impl is None  # refused before the model changed


def test_runtime_backend_fields_checked() -> None:
    with pytest.raises(ValueError, match="compile.mode: only applies to backend inductor"):
        sl.Recipe.from_dict({"steps": [{"method": "compile", "backend": "openvino",
                                        "mode": "max-autotune"}]})
    with pytest.raises(ValueError, match="compile.backend"):
        sl.Recipe.from_dict({"steps": [{"method": "compile", "backend": "tvm"}]})


def test_openvino_bf16_precision_is_checked_against_eager(tiny_llama, monkeypatch) -> None:
    ov = pytest.importorskip("openvino")
    recipe = {"steps": [{"method": "compile", "backend": "openvino", "precision": "bf16"}]}
    result = sl.compress(tiny_llama, recipe)
    assert "in bf16 where the CPU has bf16 units" in result.steps[0].notes[0]
    batch = _batch(2, 9, 6)
    with torch.no_grad():
        out, ref = result.model(**batch), tiny_llama(**batch)
    call = result.model._compiled_call_impl
    (cosine,) = call.bf16_cosines.values()
    real = batch["attention_mask"].bool()
    measured = torch.nn.functional.cosine_similarity(
        out.logits[real].double().flatten(), ref.logits[real].double().flatten(), dim=0)
    assert cosine >= 0.999 and abs(float(measured) - cosine) < 1e-6
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return  # this CPU computes float32 whatever the hint
    (runner, _), = call.graphs.values()
    assert "bfloat16" in str(runner._runner[1].get_property("INFERENCE_PRECISION_HINT"))
    assert _real_diff(out.logits, ref.logits, batch) > 1e-4  # it did compute in bf16
    monkeypatch.setattr("slimline.compile.runtime.BF16_MIN_COSINE", 1.0)
    strict = sl.compress(tiny_llama, recipe).model
    with pytest.raises(ValueError, match="compile.precision: bf16 answers at cosine"):
        strict(**batch)


@pytest.mark.parametrize("backend", ["inductor", "onnxruntime"])
def test_precision_is_openvinos_alone(backend: str) -> None:
    with pytest.raises(ValueError, match=f"compile.precision: only applies to backend openvino, "
                                         f"not {backend}"):  # fmt: skip
        sl.Recipe.from_dict({"steps": [{"method": "compile", "backend": backend,
                                        "precision": "bf16"}]})  # fmt: skip
