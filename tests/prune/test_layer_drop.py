"""``layer_drop``: Block Influence (ShortGPT, arXiv 2403.03853) and whole-block removal."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import slimline as sl
from slimline.prune.layer_drop import choose_blocks, drop_blocks, measure_block_influence

VOCAB = 96


def _llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def _tokens(batches: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, 8:] = 0  # padding must not count as tokens
        out.append({"input_ids": torch.randint(0, VOCAB, (2, 12), generator=g), "attention_mask": mask})
    return out


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = reference.log_softmax(-1)
    return float((p.exp() * (p - other.log_softmax(-1))).sum(-1).mean())


def _silence_block(model: LlamaForCausalLM, index: int) -> None:
    """Zero the residual writes of block ``index``: it becomes the identity (BI = 0)."""
    block = model.model.layers[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_block_influence_matches_hidden_states(arch: str) -> None:
    model = _llama() if arch == "llama" else _bert()
    batches = _tokens()
    bi = measure_block_influence(model, batches)
    sums, count = torch.zeros(len(bi), dtype=torch.float64), 0
    for batch in batches:
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True).hidden_states  # L+1 × (B, T, C)
        real = batch["attention_mask"].bool()
        for i in range(len(bi)):
            cos = nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)  # (B, T)
            sums[i] += cos[real].double().sum()
        count += int(real.sum())
    torch.testing.assert_close(bi, (1 - sums / count).float(), rtol=1e-5, atol=1e-6)


def test_identity_block_has_zero_influence_and_goes_first() -> None:
    model = _llama()
    _silence_block(model, 2)
    batches = _tokens()
    bi = measure_block_influence(model, batches)
    assert abs(float(bi[2])) < 1e-6 and bool((bi[[0, 1, 3]] > 1e-3).all())
    reference = _logits(model, batches[0])
    result = sl.compress(model, {"steps": [{"method": "layer_drop", "n_layers": 1}]},
                         calibration=batches)
    assert result.steps[0].modules == ["model.layers.2"]
    low_bi = result.model
    torch.testing.assert_close(_logits(low_bi, batches[0]), reference, rtol=1e-5, atol=1e-5)
    last = sl.compress(model, {"steps": [{"method": "layer_drop", "criterion": "last"}]}).model
    assert _kl(reference, _logits(low_bi, batches[0])) < 1e-8 < _kl(reference, _logits(last, batches[0]))


def test_lowest_influence_beats_highest_influence_on_kl() -> None:
    model, batches = _llama(), _tokens()
    with torch.no_grad():  # block 1 writes little into the residual stream: low BI, low loss
        model.model.layers[1].self_attn.o_proj.weight.mul_(0.05)
        model.model.layers[1].mlp.down_proj.weight.mul_(0.05)
    bi = measure_block_influence(model, batches)
    low, high = int(bi.argmin()), int(bi.argmax())
    assert low == 1
    reference = _logits(model, batches[0])
    kls = {}
    for index in (low, high):
        pruned = _llama()
        pruned.load_state_dict(model.state_dict())
        drop_blocks(pruned, "model.layers", {index})
        kls[index] = _kl(reference, _logits(pruned.eval(), batches[0]))
    assert kls[low] < kls[high]


def test_config_indices_cache_generation_and_save_load(tmp_path) -> None:
    model, batches = _llama(), _tokens()
    result = sl.compress(model, {"steps": [{"method": "layer_drop", "n_layers": 2}]},
                         calibration=batches)
    pruned = result.model
    assert pruned.config.num_hidden_layers == 2 and len(pruned.model.layers) == 2
    assert [b.self_attn.layer_idx for b in pruned.model.layers] == [0, 1]
    n_params = sum(p.numel() for p in model.model.layers[0].parameters())
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in pruned.parameters()) == 2 * n_params
    ids = batches[0]["input_ids"][:1, :5]
    cached = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    plain = ids
    for _ in range(6):
        with torch.no_grad():
            nxt = pruned(plain, use_cache=False).logits[:, -1:].argmax(-1)
        plain = torch.cat([plain, nxt], dim=1)
    torch.testing.assert_close(cached, plain)
    sl.save(pruned, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    torch.testing.assert_close(_logits(loaded, batches[0]), _logits(pruned, batches[0]), rtol=0, atol=0)


def test_bert_drop_and_layer_types_follow_the_blocks() -> None:
    model = _bert()
    pruned = sl.compress(model, {"steps": [{"method": "layer_drop", "criterion": "last"}]}).model
    assert pruned.config.num_hidden_layers == 2 and len(pruned.encoder.layer) == 2
    assert _logits(pruned, _tokens(1)[0]).shape == (2, 12, 64)
    llama = _llama()
    llama.config.layer_types = ["full_attention", "a", "b", "c"]
    drop_blocks(llama, "model.layers", {1, 3})
    assert llama.config.layer_types == ["full_attention", "b"]


def test_choose_blocks_and_targets() -> None:
    assert choose_blocks(torch.tensor([0.3, 0.1, 0.2, 0.1]), [0, 1, 2, 3], 2) == [1, 3]
    assert choose_blocks(torch.tensor([0.3, 0.1, 0.2, 0.1]), [0, 2, 3], 1) == [3]
    model = _llama()
    _silence_block(model, 2)
    step = {"method": "layer_drop", "targets": {"exclude": ["model.layers.2"]}}
    result = sl.compress(model, {"steps": [step]}, calibration=_tokens())
    assert "model.layers.2" not in result.steps[0].modules


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize(
    ("fields", "model", "match"),
    [
        ({"n_layers": 0}, "llama", "layer_drop.n_layers"),
        ({"n_layers": 4}, "llama", "layer_drop.n_layers"),
        ({"n_layers": 1}, "cnn", "layer_drop.n_layers"),
        ({"criterion": "first"}, "llama", "layer_drop.criterion"),
        ({"n_layers": 2, "targets": {"include": ["model.layers.3"]}}, "llama", "layer_drop.n_layers"),
        ({"targets": {"include": ["nothing.*"]}}, "llama", "layer_drop.targets"),
    ],
)
def test_errors_name_the_field_and_leave_the_model_untouched(fields, model, match) -> None:
    net = _llama() if model == "llama" else _CNN()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        sl.compress(net, {"steps": [{"method": "layer_drop", **fields}]}, calibration=_tokens(), inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert len(before) == len(net.state_dict())


def test_block_influence_needs_calibration_but_last_does_not() -> None:
    with pytest.raises(ValueError, match="calibration"):
        sl.compress(_llama(), {"steps": [{"method": "layer_drop"}]})
    result = sl.compress(_llama(), {"steps": [{"method": "layer_drop", "criterion": "last"}]})
    assert result.steps[0].modules == ["model.layers.3"]


def test_applies_to_needs_a_block_list() -> None:
    from slimline.prune.layer_drop import LayerDropConfig

    assert LayerDropConfig().applies_to(_llama()) and not LayerDropConfig().applies_to(_CNN())
