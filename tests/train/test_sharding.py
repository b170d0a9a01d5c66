"""``sharding: fsdp`` on two gloo processes (the path ``torchrun --nproc-per-node 2`` takes)
against one process with the same global batch, on a model of two blocks: the same loss
curve, the same trained weights, pruned weights still zero, a parameter outside the model
trained alongside, an interrupted run resumed from its checkpoint, and the model handed back
unwrapped (its own classes and Parameter objects, no DTensor, no hook). Run against the torch
this project pins (2.13): taking ``fully_shard``'s wrapping off is not a public API."""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from slimline.distill.trainable import SparsityMasks
from slimline.train.loop import train_loop
from slimline.train.options import LoopOptions
from slimline.train.sharding import blocks, is_dtensor

STEPS = 20
STOP_AT = 12  # the interrupted run fails after this optimizer step


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.out(h)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 3, generator=g)
    return [(x, torch.tanh(x @ w)) for x in (torch.randn(4, 8, generator=g) for _ in range(6))]


class Stop(Exception):
    pass


def _train(sharding: str, accumulation: int, seed_model: int, *, checkpoint_dir: str | None = None,
           stop: bool = False) -> tuple[list[float], dict[str, torch.Tensor], dict[str, object]]:  # fmt: skip
    torch.manual_seed(seed_model)  # ranks start apart: rank 0's weights must win
    model = Net()
    with torch.no_grad():
        model.layers[0].fc.weight[:, ::2] = 0.0  # a pruned layer
    proj = nn.Parameter(torch.eye(3))  # trained, but not the model's
    before = {"ids": [id(p) for p in model.parameters()], "types": [type(m) for m in model.modules()]}
    masks = SparsityMasks(model, dict(model.named_parameters()))
    batches = _batches()

    def loss(i: int) -> torch.Tensor:
        x, y = batches[i]
        return (model(x) @ proj - y).pow(2).mean()

    seen: list[bool] = []

    def after(t: int) -> None:
        seen.append(is_dtensor(model.layers[0].fc.weight))  # sharded during the run
        masks.reapply(t)
        if stop and t + 1 == STOP_AT:
            raise Stop

    options = LoopOptions(accumulation=accumulation, warmup=2, max_grad_norm=0.5, sharding=sharding,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=4 if checkpoint_dir else 0)  # fmt: skip
    losses = train_loop([{"params": list(model.parameters()), "lr": 2e-2},
                         {"params": [proj], "lr": 1e-2}], loss, len(batches), steps=STEPS, seed=0,
                        name="fsdp", options=options, model=model, after_step=after,
                        before_update=masks.mask_gradients)  # fmt: skip
    after_run = {
        "sharded": all(seen),
        "same_parameters": [id(p) for p in model.parameters()] == before["ids"],
        "same_classes": [type(m) for m in model.modules()] == before["types"],
        "dtensors": sum(is_dtensor(t) for t in model.state_dict(keep_vars=True).values()),
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
    }
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["proj"] = proj.detach().clone()
    return losses, state, after_run


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        losses, state, after_run = _train("fsdp", accumulation=1, seed_model=rank)
        save_file(state, f"{out_dir}/rank{rank}.safetensors")
        with pytest.raises(Stop):
            _train("fsdp", accumulation=1, seed_model=rank, checkpoint_dir=f"{out_dir}/ckpt", stop=True)
        resumed, resumed_state, resumed_after = _train("fsdp", accumulation=1, seed_model=rank,
                                                       checkpoint_dir=f"{out_dir}/ckpt")  # fmt: skip
        save_file(resumed_state, f"{out_dir}/resumed{rank}.safetensors")
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"losses": losses, "after": after_run, "resumed": resumed,
                       "resumed_after": resumed_after}, f)  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_blocks_are_the_module_list_entries() -> None:
    model = Net()
    assert blocks(model) == list(model.layers)


def test_fsdp_on_two_processes_matches_one_with_the_same_global_batch(tmp_path) -> None:
    one_losses, one_state, one_after = _train("fsdp", accumulation=2, seed_model=0)  # W=1: no wrap
    assert not one_after["sharded"]
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    states = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    for run in runs:
        for after in (run["after"], run["resumed_after"]):
            assert after == {"sharded": True, "same_parameters": True, "same_classes": True, "dtensors": 0,
                             "hooks": 0}  # fmt: skip
    assert runs[0]["losses"] == runs[1]["losses"]
    assert len(one_losses) == STEPS and one_losses[-1] < 0.5 * one_losses[0]
    torch.testing.assert_close(torch.tensor(runs[0]["losses"]), torch.tensor(one_losses),
                               rtol=0, atol=1e-4)  # fmt: skip
    for state in states:
        for k, v in one_state.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-4)
        pruned = state["layers.0.fc.weight"][:, ::2]
        assert torch.count_nonzero(pruned) == 0  # exact zeros after training
    # The interrupted run resumed from its step-12 checkpoint ends where the whole run did.
    for r in range(2):
        assert runs[r]["resumed"] == runs[r]["losses"]
        resumed = load_file(tmp_path / f"resumed{r}.safetensors")
        for k, v in states[r].items():
            torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6)


# --- through sl.compress, on a Hugging Face Llama ---------------------------------------------


def _llama_run(sharding: str, accumulation: int, method: str = "distill"
               ) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
    """wanda 50% then ``distill`` (every parameter, hidden states matched) or ``lora`` (merged)
    of a tiny Llama with tied embeddings; its trained weights and the training step's notes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import slimline as sl

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=True, initializer_range=0.2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, 6:] = 0  # padding, as a user's text has
        batches.append({"input_ids": torch.randint(0, 96, (2, 10), generator=g), "attention_mask": mask})
    train = ({"method": "distill", "steps": 6, "lr": 3e-3, "hidden_weight": 0.5}
             if method == "distill" else {"method": "lora", "steps": 6, "lr": 1e-2, "r": 4, "merge": True})
    recipe = {"steps": [{"method": "wanda", "sparsity": 0.5},
                        {**train, "accumulation": accumulation, "sharding": sharding}]}  # fmt: skip
    result = sl.compress(model, recipe, calibration=batches)
    assert result.model.lm_head.weight is result.model.get_input_embeddings().weight  # still tied
    state = {k: v.detach().clone().contiguous() for k, v in result.model.state_dict().items()}
    notes = [n for s in result.steps if s.method == method for n in s.notes]
    return state, notes


def _llama_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for method in ("distill", "lora"):
            state, notes = _llama_run("fsdp", accumulation=1, method=method)
            state.pop("lm_head.weight", None)  # tied to the embedding: saved once
            save_file(state, f"{out_dir}/{method}{rank}.safetensors")
            with open(f"{out_dir}/{method}{rank}.json", "w") as f:
                json.dump(notes, f)
    finally:
        dist.destroy_process_group()


def test_distill_and_lora_with_fsdp_train_a_llama_as_one_process_does(tmp_path) -> None:
    mp.start_processes(_llama_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="fork")  # fmt: skip
    for method in ("distill", "lora"):
        _same_as_one_process(tmp_path, method)


def _same_as_one_process(tmp_path, method: str) -> None:
    one, notes = _llama_run("fsdp", accumulation=2, method=method)
    for r in range(2):
        state = load_file(tmp_path / f"{method}{r}.safetensors")
        for k, v in state.items():
            torch.testing.assert_close(v, one[k], rtol=0, atol=1e-4, msg=k)
        if method == "distill":  # (a merged lora delta is dense, as peft's)
            w = state["model.layers.0.mlp.up_proj.weight"]
            assert float((w == 0).float().mean()) == 0.5  # wanda's zeros kept exactly
    ranks = [json.loads((tmp_path / f"{method}{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    ranks_note = ("2 processes, the model sharded over the ranks (FSDP2), global batch "
                  "2 micro-batches a step")  # fmt: skip
    assert ranks_note in ranks[0]
    assert [n for n in ranks[0] if n != ranks_note] == notes  # the same loss curve as one process
