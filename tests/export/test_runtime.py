"""An exported directory measured through its runtime: ``ExportedModel`` answers as the torch
model does, and ``slimline eval --model <exported dir>`` measures it beside its source."""

from __future__ import annotations

import json

import pytest
import torch

import slimline as sl
from slimline.cli import main
from slimline.core.batches import forward
from slimline.export.runtime import ExportedModel
from tests.export.test_onnx import _bert, _tokens


def test_exported_model_answers_like_the_torch_model(tmp_path) -> None:
    pytest.importorskip("openvino")
    model = _bert()
    sl.export(model, tmp_path / "ir", format="openvino", example=_tokens(2, 12))
    exported = ExportedModel(tmp_path / "ir")
    batch = _tokens(3, 10, seed=4)
    with torch.no_grad():
        out, ref = forward(exported, batch), forward(model, batch)
    real = batch["attention_mask"].bool()
    assert out.last_hidden_state is out[0] is out["last_hidden_state"]
    assert float((out[0][real] - ref[0][real]).abs().max()) < 1e-4
    report = sl.evaluate(exported, [batch], metrics=["cosine", "size"], baseline=model)
    assert report["models"]["model"]["cosine"] > 0.9999
    assert report["models"]["model"]["size_bytes_memory"] == exported.weight_bytes()
    assert report["models"]["model"]["params"] == report["models"]["baseline"]["params"]
    with pytest.raises(ValueError, match="needs input"):
        exported(input_ids=batch["input_ids"])


def test_cli_eval_measures_an_onnx_export_beside_its_source(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "digits"
    assert main(["export", "--model", "digits-cnn@small", "--format", "onnx",
                 "--out", str(out)]) == 0
    report_file = tmp_path / "eval.json"
    code = main(["eval", "--model", str(out), "--metrics", "latency,size,memory,cosine",
                 "--batches", "1", "--runs", "2", "--threads", "1",
                 "--report", str(report_file)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(report_file.read_text())
    exported, source = report["models"]["model"], report["models"]["baseline"]  # the built-in
    assert exported["cosine"] > 0.9999
    assert exported["size_bytes_memory"] == (out / "model.onnx").stat().st_size
    assert exported["params"] == source["params"]
    assert exported["latency_ms_median"] > 0 and exported["peak_memory_bytes"] > 0
    assert report["conditions"]["peak_memory_method"] == "own process"
