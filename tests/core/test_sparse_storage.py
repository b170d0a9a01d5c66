from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.core import sparse_storage as ss


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(numel: int) -> None:
    mask = torch.rand(numel) > 0.5
    packed = ss.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 7) // 8
    assert torch.equal(ss.unpack_bits(packed, numel), mask)


def test_pack_bits_little_endian_reference() -> None:
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert ss.pack_bits(mask).tolist() == [0b10000001, 0b00000001]


def test_encode_decode_exact() -> None:
    w = torch.randn(32, 48)
    w[torch.rand_like(w) < 0.5] = 0
    assert ss.worth_encoding(w)
    mask, values = ss.encode(w)
    assert torch.equal(ss.decode(mask, values, (32, 48)), w)
    assert not ss.worth_encoding(torch.randn(32, 48))


def test_pruned_checkpoint_shrinks(tmp_path, tiny_llama) -> None:
    def weights_bytes(path) -> int:
        return (path / "model.safetensors").stat().st_size

    sl.save(tiny_llama, tmp_path / "dense")
    for spec, name in (({"sparsity": 0.5}, "half"), ({"pattern": "2:4"}, "nm")):
        model = sl.compress(tiny_llama, {"steps": [{"method": "magnitude", **spec}]}).model
        sl.save(model, tmp_path / name)
        loaded = sl.load(tmp_path / name)
        for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert torch.equal(a, b), n
        # the pruned Linear layers dominate this model except for embeddings and head
        linear = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and n != "lm_head")
        saved = weights_bytes(tmp_path / "dense") - weights_bytes(tmp_path / name)
        assert saved >= 0.4 * linear  # ≈ 1/2 − 1/32 of the pruned layers' bytes
