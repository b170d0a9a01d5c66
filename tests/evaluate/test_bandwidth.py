"""The decode bandwidth bound: measured read bandwidth, bytes read per token, their ratio."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.evaluate.bandwidth import (
    Bandwidth,
    bandwidth_bound,
    decode_bytes_per_token,
    streaming_read_bandwidth,
)


def test_measured_bandwidth_is_physically_plausible() -> None:
    measured = streaming_read_bandwidth(32 * 2**20, runs=3)
    assert measured.n_bytes == 32 * 2**20 and len(measured.seconds) == 3
    assert 1e8 < measured.median_bytes_per_s <= measured.best_bytes_per_s < 1e13
    tiny = streaming_read_bandwidth(10, runs=1, warmup=0)  # rounds down to whole float32s
    assert tiny.n_bytes == 8


def test_summaries_of_given_times() -> None:
    reads = Bandwidth(n_bytes=1000, seconds=(2.0, 1.0, 4.0))
    assert reads.median_bytes_per_s == 500.0 and reads.best_bytes_per_s == 1000.0
    assert bandwidth_bound(250, 500.0) == 2.0


@pytest.mark.parametrize(("kwargs", "match"), [({"n_bytes": 2}, "n_bytes"), ({"runs": 0}, "runs"),
                                               ({"warmup": -1}, "warmup")])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        streaming_read_bandwidth(**kwargs)
    with pytest.raises(ValueError, match="positive"):
        bandwidth_bound(0, 1.0)


def _by_hand(model: nn.Module) -> int:
    """Every stored tensor's bytes, but each embedding table counts one row."""
    total = 0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        total += tensor.shape[1] * tensor.element_size() if "embed_tokens" in name else size
    return total


def test_bytes_per_token_of_a_llama_float_and_quantized(tiny_llama) -> None:
    assert decode_bytes_per_token(tiny_llama) == _by_hand(tiny_llama)
    quantized = sl.compress(tiny_llama, {"steps": [{"method": "rtn", "bits": 4, "group_size": 32}]}).model
    assert decode_bytes_per_token(quantized) == _by_hand(quantized)
    assert decode_bytes_per_token(quantized) < 0.5 * decode_bytes_per_token(tiny_llama)


def test_tied_embedding_is_read_in_full_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 8)
            self.head = nn.Linear(8, 100, bias=False)
            self.head.weight = self.embed.weight

    assert decode_bytes_per_token(Tied()) == 100 * 8 * 4
    assert decode_bytes_per_token(nn.Embedding(100, 8)) == 8 * 4
    assert decode_bytes_per_token(nn.Linear(8, 4).to(torch.bfloat16)) == (8 * 4 + 4) * 2
