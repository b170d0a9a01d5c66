from __future__ import annotations

import torch

from slimline.core.calibration import capture_inputs, find_blocks, walk_blocks


def test_capture_inputs_sees_every_batch(tiny_mlp) -> None:
    seen: dict[str, list[torch.Tensor]] = {}
    batches = [torch.randn(5, 32) for _ in range(3)]
    capture_inputs(tiny_mlp, {"fc2": tiny_mlp.fc2}, batches, lambda n, x: seen.setdefault(n, []).append(x))
    assert len(seen["fc2"]) == 3
    with torch.no_grad():
        expected = tiny_mlp.norm(torch.relu(tiny_mlp.fc1(batches[1])))
    torch.testing.assert_close(seen["fc2"][1], expected)


def test_find_blocks_llama(tiny_llama) -> None:
    name, blocks = find_blocks(tiny_llama)
    assert name == "model.layers" and len(blocks) == 2


def test_walk_blocks_reproduces_hidden_states(tiny_llama, token_batches) -> None:
    """Block by block, each block's recorded input equals the full model's hidden state."""
    with torch.no_grad():
        ref = tiny_llama(**token_batches[0], output_hidden_states=True).hidden_states
    for index, name, _block, inputs in walk_blocks(tiny_llama, token_batches):
        assert name == f"model.layers.{index}"
        hidden = inputs[0].args[0] if inputs[0].args else inputs[0].kwargs["hidden_states"]
        torch.testing.assert_close(hidden, ref[index], atol=1e-5, rtol=1e-5)
        assert len(inputs) == len(token_batches)


def test_walk_blocks_sees_changed_block(tiny_llama, token_batches) -> None:
    """A change to block 0 made during the walk shows in block 1's inputs (sequential)."""
    walk = walk_blocks(tiny_llama, token_batches[:1])
    _, _, block0, inputs0 = next(walk)
    before = (inputs0[0].args[0] if inputs0[0].args else inputs0[0].kwargs["hidden_states"]).clone()
    with torch.no_grad():
        block0.mlp.down_proj.weight.zero_()
        block0.self_attn.o_proj.weight.zero_()
    _, _, _, inputs1 = next(walk)
    after = inputs1[0].args[0] if inputs1[0].args else inputs1[0].kwargs["hidden_states"]
    torch.testing.assert_close(after, before)  # a zeroed block is the identity (residual)
