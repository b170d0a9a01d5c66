"""``sl.export(format="onnx")``: onnxruntime's outputs against the torch model's, checked here
independently of the exporter's own parity check (inputs it never saw, another batch size
and sequence length), and what is refused before anything is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slimline as sl
from slimline.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx
import onnxruntime

VOCAB = 96
INTERMEDIATE = 128  # no other dimension of the tiny models is 128 (see the pruning test)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=64)).eval()


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=INTERMEDIATE,
                                max_position_embeddings=64)).eval()


def _tokens(batch: int, length: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded token batch: the last row ends with three padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, max(1, length - 3):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _onnx_vs_torch(model: nn.Module, directory: Path, batch: dict[str, torch.Tensor]) -> float:
    """Max abs difference of onnxruntime's first output and the torch model's first output."""
    session = onnxruntime.InferenceSession(str(directory / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    out = session.run(None, feeds)[0]
    with torch.no_grad():
        ref = model(**batch)[0].numpy()
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max())


BUILDERS: dict[str, Callable[[], nn.Module]] = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_onnxruntime_matches_torch_on_other_batch_and_sequence_lengths(tmp_path, arch) -> None:
    model = BUILDERS[arch]()
    out = tmp_path / "out"
    report = sl.export(model, out, format="onnx", example=_tokens(2, 12))
    for batch, length in [(2, 12), (1, 5), (4, 23)]:  # dynamic batch and sequence axes
        assert _onnx_vs_torch(model, out, _tokens(batch, length, seed=7)) < 1e-4
    stored = json.loads((out / "export.json").read_text())
    assert stored == report.to_dict()
    # the example, another batch and length, one token, left-padded
    assert [p["shape"] for p in stored["parity"]] == [[2, 12], [3, 11], [2, 1], [2, 12]]
    assert all(p["passed"] and p["max_abs_diff"] < 1e-4 for p in stored["parity"])
    assert stored["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_dynamo_exporter_and_external_data(tmp_path) -> None:
    model = _bert()
    out = tmp_path / "out"
    report = sl.export(model, out, example=_tokens(2, 12), exporter="dynamo", external_data=True)
    assert report.exporter == "dynamo" and report.external_data
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert (out / "model.onnx.data").stat().st_size > 0.8 * weight_bytes
    assert _onnx_vs_torch(model, out, _tokens(3, 9, seed=5)) < 1e-4


def test_exported_in_eval_mode_and_training_flags_restored(tmp_path) -> None:
    model = _bert().train()  # dropout 0.1 on: a graph traced like this would be random
    out = tmp_path / "out"
    sl.export(model, out, example=_tokens(2, 12))
    assert all(m.training for m in model.modules())  # the caller's modes are given back
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [n.op_type for n in graph.node if n.op_type == "Dropout"]
    assert _onnx_vs_torch(model.eval(), out, _tokens(2, 10, seed=3)) < 1e-4


def test_structured_pruned_model_exports_as_the_smaller_dense_model(tmp_path) -> None:
    model = _llama()
    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    pruned = sl.compress(model, {"steps": [{"method": "structured", "sparsity": 0.5,
                                            "units": ["neurons"]}]},
                         calibration=calibration).model.eval()
    out = tmp_path / "out"
    sl.export(pruned, out, example=_tokens(2, 12))
    weights = onnx.load(str(out / "model.onnx")).graph.initializer
    dims = {d for w in weights for d in w.dims}
    assert INTERMEDIATE // 2 in dims and INTERMEDIATE not in dims  # half the MLP neurons
    assert _onnx_vs_torch(pruned, out, _tokens(3, 7, seed=4)) < 1e-4


def _real_token_diff(out: np.ndarray, ref: np.ndarray, batch: dict[str, torch.Tensor]) -> float:
    """Max abs difference over real tokens (a padded position's output is arbitrary)."""
    assert out.shape == ref.shape
    real = batch["attention_mask"].bool().numpy()
    return float(np.abs(out[real] - ref[real]).max())


def _integer_gemms(file: Path) -> list[tuple[str, str]]:
    """(weight dtype, weight zero point dtype) of each MatMulInteger of the graph."""
    graph = onnx.load(str(file)).graph
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:  # in order: an Identity reads an earlier (deduplicated) tensor
        if node.op_type == "Constant":
            consts[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Identity" and node.input[0] in consts:
            consts[node.output[0]] = consts[node.input[0]]
    name = onnx.helper.tensor_dtype_to_np_dtype
    return [(str(name(consts[n.input[1]].data_type)), str(name(consts[n.input[3]].data_type)))
            for n in graph.node if n.op_type == "MatMulInteger"]


@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize(("step", "exporter"), [
    ({"method": "int8_dynamic"}, "torchscript"),
    ({"method": "smoothquant", "activations": "static"}, "torchscript"),
    ({"method": "smoothquant"}, "dynamo"),
])
def test_w8a8_layers_export_as_integer_gemms(tmp_path, monkeypatch, step, exporter, bits) -> None:
    from slimline.quantize import kernels_int8

    monkeypatch.setattr(kernels_int8, "activation_bits", lambda: bits)  # either grid, any CPU
    calibration = [_tokens(2, 16, seed=s) for s in range(2)]
    model = sl.compress(_bert(), {"steps": [step]}, calibration=calibration).model.eval()
    assert {m.activation_bits for m in model.modules() if hasattr(m, "activation_bits")} == {bits}
    out = tmp_path / "out"
    report = sl.export(model, out, example=_tokens(2, 12), exporter=exporter)
    assert report.exporter == exporter and len(report.lowered) == 12  # 2 × (q k v o up down)
    # u8·s8 for 7-bit activations; u8·u8 (weights shifted, zero point 128) for 8-bit ones
    kind = ("int8", "int8") if bits == 7 else ("uint8", "uint8")
    assert _integer_gemms(out / "model.onnx") == [kind] * 12
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    for shape, seed in [((3, 17), 9), ((1, 5), 2)]:
        batch = _tokens(*shape, seed=seed)
        with torch.no_grad():
            ref = model(**batch)[0]  # the torch model on its own int8 kernels
        got = session.run(None, {k: v.numpy() for k, v in batch.items()})[0]
        assert _real_token_diff(got, ref.numpy(), batch) < 1e-4


def test_integer_gemm_is_exact_where_u8_s8_pair_sums_saturate(tmp_path) -> None:
    """Codes near 255 times weights of 127: pairs of products past int16, which a u8·s8
    GEMM without an int8 dot product saturates; the exported u8·u8 GEMM does not."""
    from slimline.quantize.kernels_int8 import quantize_per_token
    from slimline.quantize.w8a8 import Int8DynamicLinear

    linear = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.weight[4:] = -1.0
    model = nn.Sequential(Int8DynamicLinear.from_float(linear, activation_bits=8)).eval()
    x = torch.rand(5, 64) + 3.0  # all positive: codes up to 254 (kernels_int8 grid)
    out = tmp_path / "out"
    sl.export(model, out, example=x)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    codes, scale, zero = quantize_per_token(x, 8)
    assert int(codes.max()) >= 250
    layer = model[0]
    exact = ((codes.double() - zero.double()) @ layer.qweight.double().T) \
        * scale.double() * layer.weight_scale.double()  # integer sums, no saturation
    assert float((got.double() - exact).abs().max()) < 1e-4 * float(exact.abs().max())


def test_packed_layer_refused_and_nothing_written(tmp_path) -> None:
    model = sl.compress(_llama(), {"steps": [{"method": "rtn", "bits": 4}]}).model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier export")
    with pytest.raises(ValueError, match="QuantLinear.*cannot be exported to ONNX"):
        sl.export(model, out, example=_tokens(2, 8))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "out"]


class _ShapeBranch(nn.Module):
    """Answers differently for a batch of more than two rows: tracing freezes the branch the
    example took, so the graph is wrong at another batch size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] > 2 else x


def test_graph_wrong_at_another_shape_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="parity failed"):
        sl.export(_ShapeBranch(), tmp_path / "out", example=torch.randn(2, 4),
                  exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_plain_tensor_model_and_bad_arguments(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    report = sl.export(model, tmp_path / "out", example=torch.randn(5, 4))
    assert report.inputs == ["input"] and report.dynamic_axes["output"] == {0: "batch"}
    with pytest.raises(ValueError, match="format 'tflite' is not supported"):
        sl.export(model, tmp_path / "g", format="tflite", example=torch.randn(5, 4))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gguf writes Hugging Face llama, mistral, qwen2, qwen3, phi3, gpt2, gemma, gemma2 models"):
        sl.export(model, tmp_path / "g", format="gguf", example=torch.randn(5, 4))
    with pytest.raises(ValueError, match="example"):
        sl.export(model, tmp_path / "g")
    with pytest.raises(TypeError, match="example"):
        sl.export(model, tmp_path / "g", example=[1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_writes_the_directory_and_prints_parity(tmp_path, capsys) -> None:
    out = tmp_path / "digits"
    code = main(["export", "--model", "digits-cnn@small", "--format", "onnx", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "parity ok on input (2, 1, 8, 8)" in printed and "parity ok on input (3" in printed
    assert {"model.onnx", "export.json"} <= {p.name for p in out.iterdir()}


def test_cli_error_is_one_line(tmp_path, capsys) -> None:
    code = main(["export", "--model", str(tmp_path / "none"), "--format", "onnx",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "neither a built-in model" in err


def test_sl_export_is_both_the_function_and_the_subpackage() -> None:
    import importlib

    package = importlib.import_module("slimline.export")
    assert sl.export is package and callable(sl.export)
    assert importlib.import_module("slimline.export.onnx").MODEL_FILE == "model.onnx"
