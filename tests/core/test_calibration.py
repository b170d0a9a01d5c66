from __future__ import annotations

import pytest
import torch

from slimline.core.calibration import (
    RealTokens,
    capture_inputs,
    find_blocks,
    sequential_layers,
    walk_blocks,
)
from slimline.core.statistics import InputStats


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


def _padded(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The same batches with the second sequence of each padded after 10 tokens."""
    out = []
    for batch in batches:
        mask = batch["attention_mask"].clone()
        mask[1, 10:] = 0
        out.append({"input_ids": batch["input_ids"], "attention_mask": mask})
    return out


def _collect(model, batches, share: bool):
    made: list[str] = []
    seen: dict[str, InputStats] = {}

    def make(name: str, module: torch.nn.Module) -> InputStats:
        made.append(name)
        return InputStats(module.in_features, hessian=True)

    def update(group, stats) -> None:
        seen.update(stats)

    sequential_layers(model, [n for n, _ in linear_layers(model)], batches, make, update,
                      share_inputs=share)  # fmt: skip
    return made, seen


def linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # fmt: skip


def test_layers_reading_one_input_share_one_accumulator(tiny_llama, token_batches) -> None:
    """With ``share_inputs``, q/k/v (and gate/up) of a block get one accumulator, fed once per
    batch, holding exactly the statistics each layer gets on its own; others stay separate."""
    batches = _padded(token_batches)
    made_alone, alone = _collect(tiny_llama, batches, share=False)
    made_shared, shared = _collect(tiny_llama, batches, share=True)
    assert set(alone) == set(shared) and len(made_alone) == 14
    assert len(made_shared) == 8  # per block: qkv, o, gate/up, down
    for name, acc in alone.items():
        assert shared[name].tokens == acc.tokens == 3 * (16 + 10)  # real tokens only
        torch.testing.assert_close(shared[name].xxt, acc.xxt, rtol=0, atol=0)
        torch.testing.assert_close(shared[name].sq_norm, acc.sq_norm, rtol=0, atol=0)
    for b in range(2):
        attn, mlp = f"model.layers.{b}.self_attn", f"model.layers.{b}.mlp"
        assert shared[f"{attn}.q_proj"] is shared[f"{attn}.k_proj"] is shared[f"{attn}.v_proj"]
        assert shared[f"{mlp}.gate_proj"] is shared[f"{mlp}.up_proj"]
        assert shared[f"{attn}.o_proj"] is not shared[f"{attn}.q_proj"]
        assert shared[f"{mlp}.down_proj"] is not shared[f"{mlp}.up_proj"]


def test_input_stats_match_the_textbook_sums() -> None:
    """Fed in batches (more tokens than one slice), Σx² and X Xᵀ equal the float64 sums."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(1500, 8, generator=g), torch.randn(3, 700, 8, generator=g)]
    acc = InputStats(8, hessian=True)
    for x in parts:
        acc.add_batch(x)
    flat = torch.cat([p.reshape(-1, 8) for p in parts]).double()
    assert acc.tokens == 3600
    torch.testing.assert_close(acc.sq_norm, (flat**2).sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(acc.hessian.double(), 2 / 3600 * flat.t() @ flat,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    expected = acc.hessian
    taken = acc.take_hessian()  # the same H, made in place: the accumulator has none after
    torch.testing.assert_close(taken, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no Hessian"):
        _ = acc.hessian


def test_a_batch_without_padding_hands_over_its_inputs_uncopied() -> None:
    tokens = RealTokens()
    x = torch.randn(2, 5, 4)
    tokens.mask = torch.ones(2, 5, dtype=torch.bool)
    assert tokens.keep(x) is x
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    tokens.mask = mask
    torch.testing.assert_close(tokens.keep(x), torch.cat([x[0, :3], x[1]]))


def test_layers_replaced_by_update_are_freed_before_the_next_block(tiny_llama, token_batches) -> None:
    """``sequential_layers`` keeps no reference to a layer once ``update`` has replaced it:
    with in-place quantization the float model shrinks as the walk goes."""
    import gc
    import weakref

    names = [n for n, _ in linear_layers(tiny_llama)]
    replaced: list[weakref.ref[torch.nn.Module]] = []
    alive_at_block: list[int] = []

    def make(_name: str, module: torch.nn.Module) -> InputStats:
        return InputStats(module.in_features, hessian=False)

    def update(group, stats) -> None:
        gc.collect()
        alive_at_block.append(sum(ref() is not None for ref in replaced))
        for name, module in group.items():
            replaced.append(weakref.ref(module))
            new = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            tiny_llama.set_submodule(name, new)

    sequential_layers(tiny_llama, names, token_batches, make, update, share_inputs=True)
    assert alive_at_block == [0, 0] and len(replaced) == 14
