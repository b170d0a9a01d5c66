from __future__ import annotations

import pytest
import torch

from slimline.core.targets import Targets, linear_weight, output_head_names, select


def test_default_excludes_output_head(tiny_mlp) -> None:
    names = [n for n, _ in select(tiny_mlp, Targets())]
    assert names == ["fc1", "fc2"]


def test_hf_head_is_output_embeddings(tiny_llama) -> None:
    assert output_head_names(tiny_llama) == {"lm_head"}
    names = [n for n, _ in select(tiny_llama, Targets())]
    assert "lm_head" not in names
    assert len(names) == 2 * 7  # q k v o gate up down per block


def test_include_and_exclude_globs(tiny_llama) -> None:
    chosen = select(tiny_llama, Targets(include=("*.mlp.*",), exclude=("*.down_proj",)))
    assert [n.split(".")[-1] for n, _ in chosen] == ["gate_proj", "up_proj"] * 2


def test_include_container_keeps_layers_inside(tiny_llama) -> None:
    chosen = select(tiny_llama, Targets(include=("model.layers.0.mlp*",)))
    assert len(chosen) == 3


def test_include_matching_nothing_raises(tiny_mlp) -> None:
    with pytest.raises(ValueError, match="matches no module"):
        select(tiny_mlp, Targets(include=("decoder.*",)), step="s")


def test_include_unsupported_layer_raises(tiny_mlp) -> None:
    with pytest.raises(ValueError, match="matches only LayerNorm"):
        select(tiny_mlp, Targets(include=("norm",)), step="s")


def test_conv1d_weight_is_transposed() -> None:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(6, 4)  # (nf=out, nx=in): weight stored (in, out)
    assert linear_weight(layer).shape == (6, 4)
    x = torch.randn(3, 4)
    ref = x @ linear_weight(layer).t() + layer.bias
    torch.testing.assert_close(layer(x), ref)


def test_targets_validation() -> None:
    with pytest.raises(TypeError):
        Targets(include="fc1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown key"):
        Targets.from_dict({"only": ["x"]})
