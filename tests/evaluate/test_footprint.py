"""Bytes, parameters, sparsity and FLOPs against hand-computed numbers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune
from safetensors.torch import save_file
from torch import nn

from slimline.evaluate import footprint


def test_size_of_fp32_linear_is_weights_plus_bias() -> None:
    # 10 × 20 weights + 10 biases, 4 bytes each
    assert footprint.size_in_memory(nn.Linear(20, 10)) == (200 + 10) * 4 == 840


def test_size_of_bf16_linear_is_half() -> None:
    assert footprint.size_in_memory(nn.Linear(20, 10).to(torch.bfloat16)) == 420


def test_tied_weights_count_once() -> None:
    embed = nn.Embedding(50, 8)
    head = nn.Linear(8, 50, bias=False)
    head.weight = embed.weight
    model = nn.ModuleDict({"embed": embed, "head": head})
    assert footprint.size_in_memory(model) == 50 * 8 * 4
    assert footprint.count_params(model) == 50 * 8


class _Packed(nn.Module):
    """A stand-in for a packed int4 Linear: two 4-bit weights per uint8, fp16 scales."""

    def __init__(self, out_features: int, in_features: int, group: int) -> None:
        super().__init__()
        self.shape = (out_features, in_features)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2,
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group,
                                                  dtype=torch.float16))
        self.register_buffer("stats", torch.zeros(3))  # a float buffer also counts

    def logical_numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def zero_count(self) -> int:
        return 5


def test_packed_int4_counts_its_real_bytes_and_logical_params() -> None:
    packed = _Packed(16, 32, group=8)
    model = nn.Sequential(packed, nn.Linear(16, 4))
    # half a byte per weight + 2-byte scales per group of 8 + the fp32 buffer + fp32 Linear
    assert footprint.size_in_memory(model) == 16 * 32 // 2 + 16 * 4 * 2 + 3 * 4 + (64 + 4) * 4
    assert footprint.count_params(model) == 16 * 32 + 64 + 4
    zeros, total = footprint.weight_zero_counts(model)
    assert (zeros, total) == (5, 16 * 32 + 64)


def test_views_of_one_storage_count_once() -> None:
    model = nn.Module()
    base = torch.zeros(100)
    model.register_buffer("a", base[:50])
    model.register_buffer("b", base[50:])
    assert footprint.size_in_memory(model) == 400


def test_torch_dynamic_int8_linear_counts_its_packed_weight() -> None:
    model = nn.Sequential(nn.Linear(20, 10))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    # int8 weights, per-tensor scale (no tensor), fp32 bias
    assert footprint.size_in_memory(quantized) == 200 * 1 + 10 * 4
    assert footprint.count_params(quantized) == 210


def test_sparsity_counts_exact_zeros_of_linear_like_weights() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.LayerNorm(10), nn.Conv1d(2, 5, 3))
    with torch.no_grad():
        model[0].weight[:3] = 0.0  # 30 of 100
        model[0].bias.zero_()  # biases do not count
        model[2].weight[0] = 0.0  # 6 of 30
    assert footprint.weight_zero_counts(model) == (36, 130)
    assert footprint.sparsity(model) == pytest.approx(36 / 130)


def test_sparsity_sees_a_masked_weight_through_torch_prune() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.25)
    assert footprint.sparsity(model) == pytest.approx(16 / 64)


def test_flops_of_linear_on_a_batch() -> None:
    assert footprint.count_flops(nn.Linear(64, 32), torch.randn(8, 64)) == 2 * 8 * 64 * 32


def test_directory_bytes_equals_sum_of_file_sizes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1234)
    (tmp_path / "sub" / "b.json").write_text("{}")
    assert footprint.directory_bytes(tmp_path) == 1234 + 2


def _walk_sizes(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def test_size_on_disk_is_the_bytes_save_writes(tmp_path: Path) -> None:
    written: list[Path] = []

    def save(model: nn.Module, path: Path) -> Path:
        path.mkdir()
        save_file(dict(model.state_dict()), str(path / "model.safetensors"))
        (path / "recipe.json").write_text('{"steps": []}')
        written.append(path)
        return path

    model = nn.Linear(20, 10)
    size = footprint.size_on_disk(model, save=save)
    reference = tmp_path / "copy"
    save(model, reference)
    assert size == _walk_sizes(reference)
    assert size > 840  # the tensors plus the safetensors header and the JSON


@pytest.mark.skipif(importlib.util.find_spec("slimline.core.checkpoint") is None,
                    reason="slimline.core.checkpoint.save not written yet")
def test_size_on_disk_with_slimline_save(tmp_path: Path) -> None:
    from slimline.core.checkpoint import save

    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 2))
    size = footprint.size_on_disk(model)
    save(model, tmp_path / "m")
    assert size == _walk_sizes(tmp_path / "m")
