"""``sl.export(format="openvino")``: OpenVINO's outputs against the torch model's, checked here
independently of the exporter's own parity check (inputs it never saw, another batch size and
sequence length, a left-padded batch fed as ``core.batches.forward`` feeds the torch model),
slimline's W8A8 layers converted with their int8 weights, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slimline as sl
from slimline.cli import main
from slimline.core.batches import forward
from tests.export.test_onnx import _bert, _llama, _real_token_diff, _tokens

ov = pytest.importorskip("openvino")


def _run_ir(directory: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(directory / "model.xml")), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({k: v.numpy() for k, v in batch.items()})[compiled.output(0)]


def _torch(model: nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return forward(model, batch)[0].numpy()


def _left_padded(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    tokens = _tokens(batch, length, seed)
    tokens["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    tokens["attention_mask"][0, :3] = 0
    return tokens


def test_ir_matches_torch_on_other_shapes_and_left_padding(tmp_path) -> None:
    model = _llama()
    out = tmp_path / "out"
    report = sl.export(model, out, format="openvino", example=_tokens(2, 12))
    for batch in (_tokens(4, 23, seed=7), _tokens(1, 1, seed=2), _left_padded(3, 9, seed=5)):
        assert _real_token_diff(_run_ir(out, batch), _torch(model, batch), batch) < 1e-4
    stored = json.loads((out / "export.json").read_text())
    assert stored == report.to_dict() and stored["format"] == "openvino"
    assert [p["shape"] for p in stored["parity"]] == [[2, 12], [3, 11], [2, 1], [2, 12]]
    assert all(p["passed"] for p in stored["parity"])
    assert {"model.xml", "model.bin", "config.json"} <= {p.name for p in out.iterdir()}
    inputs = ov.Core().read_model(str(out / "model.xml")).inputs
    assert [i.get_any_name() for i in inputs] == ["input_ids", "attention_mask"]
    assert all(i.get_partial_shape().is_dynamic for i in inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


@pytest.mark.parametrize(("step", "exporter"), [
    ({"method": "int8_dynamic"}, "torchscript"),
    ({"method": "smoothquant", "activations": "static"}, "torchscript"),
    ({"method": "smoothquant", "activations": "static"}, "dynamo"),
])
def test_w8a8_layers_convert_with_int8_weights(tmp_path, step, exporter) -> None:
    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    model = sl.compress(_bert(), {"steps": [step]}, calibration=calibration).model.eval()
    out = tmp_path / "out"
    report = sl.export(model, out, format="openvino", example=_tokens(2, 12), exporter=exporter)
    assert report.exporter == exporter
    assert len(report.lowered) == 12  # 2 layers × (q, k, v, o, up, down)
    batch = _tokens(3, 17, seed=9)
    # against the torch model running its own int8 kernels, compiled as a user would (plain
    # OpenVINO): the IR's runtime_options switch off OpenVINO's own re-quantization of the
    # activations, which on VNNI/AMX CPUs otherwise moved this model by 9e-4
    assert _real_token_diff(_run_ir(out, batch), _torch(model, batch), batch) < 1e-4
    ir_model = ov.Core().read_model(str(out / "model.xml"))
    assert ir_model.get_rt_info(["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"]).astype(str) == "0"
    int8 = [op for op in ir_model.get_ops() if op.get_type_name() == "Constant"
            and op.get_output_element_type(0) == ov.Type.i8]
    assert len(int8) == 12  # one int8 weight per layer, not folded to float
    rounds = [op for op in ir_model.get_ops() if op.get_type_name() == "Round"]
    per_layer = 1 if step.get("activations") == "static" else 2  # codes (+ per-token zero)
    assert len(rounds) == 12 * per_layer  # each layer's activations rounded to its grid


def test_packed_weight_only_layer_refused_and_nothing_written(tmp_path) -> None:
    model = sl.compress(_llama(), {"steps": [{"method": "rtn", "bits": 4}]}).model
    with pytest.raises(ValueError, match="QuantLinear.*cannot be converted to OpenVINO"):
        sl.export(model, tmp_path / "out", format="openvino", example=_tokens(2, 8))
    with pytest.raises(ValueError, match="exporter must be"):
        sl.export(_llama(), tmp_path / "out", format="openvino", example=_tokens(2, 8),
                  exporter="onnx")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_the_ir_and_prints_parity(tmp_path, capsys) -> None:
    out = tmp_path / "digits"
    code = main(["export", "--model", "digits-cnn@small", "--format", "openvino",
                 "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "parity ok on input (2, 1, 8, 8)" in printed
    assert {"model.xml", "model.bin", "export.json"} <= {p.name for p in out.iterdir()}


def test_tolerance_is_checked_first_and_recorded(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="min_cosine must be in"):
        sl.export(model, tmp_path / "out", format="openvino", example=torch.randn(2, 4),
                  min_cosine=2.0)
    assert list(tmp_path.iterdir()) == []
    report = sl.export(model, tmp_path / "out", format="openvino", example=torch.randn(2, 4),
                       min_cosine=0.999, atol=1e-3)
    stored = json.loads((tmp_path / "out" / "export.json").read_text())
    assert stored["tolerance"] == {"atol_of_scale": 1e-3, "min_cosine": 0.999}
    assert report.passed and stored["lowered"] == []


# --- a known OpenVINO crash becomes an error --------------------------------------------------


def _tiny_ir(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    path = tmp_path / "mlp.xml"
    ov.save_model(ov.convert_model(model, example_input=torch.randn(2, 8)), str(path))
    return path


BF16_ONE_THREAD = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}


def test_a_compile_that_kills_its_process_is_an_error_naming_the_signal(tmp_path, monkeypatch) -> None:
    from slimline.export import openvino as exporter

    monkeypatch.setattr(exporter, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGFPE)")
    with pytest.raises(ValueError, match=r"crashed \(SIGFPE\).*precision f32"):
        exporter.check_compiles(_tiny_ir(tmp_path), dict(BF16_ONE_THREAD))


def test_the_probe_compiles_a_healthy_ir_and_runs_only_for_bf16_on_one_thread(tmp_path, monkeypatch) -> None:
    from slimline.export import openvino as exporter

    ir = _tiny_ir(tmp_path)
    exporter.check_compiles(ir, dict(BF16_ONE_THREAD))  # the real child: compiles, no error
    assert exporter.compile_ir(ir, "bf16", threads=1) is not None

    def no_child(*args, **kwargs):
        raise AssertionError("no probe expected")

    monkeypatch.setattr(exporter.subprocess, "run", no_child)
    exporter.check_compiles(ir, {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
    exporter.check_compiles(ir, {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 2})
