"""``structured``: physical removal of heads, neurons and channels.

References: slicing everything (keep all) or removing units that contribute exactly zero must
leave outputs unchanged; shapes, config, parameter count and FLOPs must equal those of a model
built fresh at the new sizes; save → load must reproduce the outputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

import slimline as sl
from slimline.models.digits_cnn import DigitsCNN
from slimline.prune.groups import UnitGroup, sequential_groups, transformer_groups
from slimline.prune.structured import keep_units, removal_count
from slimline.prune.surgery import prune_group, refit_consumer, unit_features

VOCAB = 96


def _llama(layers: int = 2, kv: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _phi3(layers: int = 2, kv: int = 2) -> Phi3ForCausalLM:
    """Phi-3's fused layout: one qkv_proj (query, key, value rows), one gate_up_proj."""
    torch.manual_seed(0)
    config = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv,
                        max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    return Phi3ForCausalLM(config).eval()


def _neox() -> nn.Module:
    """GPT-NeoX (Pythia): per-head [q | k | v] rows in query_key_value, biases, partial rotary."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64)  # fmt: skip
    return GPTNeoXForCausalLM(config).eval()


def _bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


class ConvNet(nn.Module):
    """conv → BN → ReLU → conv → ReLU → pool → flatten → Linear → ReLU → Linear (head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(12 * 4 * 4, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))  # (B, 8, 8, 8)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 12, 4, 4)
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _convnet() -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():  # non-trivial BN statistics, so slicing them matters
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _tokens(batches: int = 2) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(batches):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0  # one padded sequence
        out.append({"input_ids": torch.randint(0, VOCAB, (2, 12), generator=g), "attention_mask": mask})
    return out


def _images(batches: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(batches)]


def _out(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(batch, torch.Tensor):
            return model(batch)
        out = model(**batch)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: nn.Module, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        _out(model, batch)
    return counter.get_total_flops()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _groups(model: nn.Module, kind: str, gqa: str = "kv_groups") -> list[UnitGroup]:
    found = transformer_groups(model, kind, gqa)  # type: ignore[arg-type]
    if found is None:
        found = [g for g in sequential_groups(model, kind).values() if isinstance(g, UnitGroup)]  # type: ignore[arg-type]
    return found


# ---------------------------------------------------------------- pure helpers


def test_unit_features_keep_units_and_removal_count() -> None:
    assert unit_features(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    scores = torch.tensor([5.0, 1.0, 3.0, 0.0, 2.0, 9.0])
    assert keep_units(scores, 2).tolist() == [0, 2, 4, 5]
    # two partitions (KV groups) of three query heads: each loses its lowest one
    assert keep_units(scores, 2, partitions=2).tolist() == [0, 2, 4, 5]
    assert keep_units(torch.tensor([1.0, 0.0, 2.0, 3.0]), 2, partitions=2).tolist() == [0, 3]
    assert removal_count(1536, 1, 0.3) == 461  # nearest
    assert removal_count(2, 1, 0.25) == 1  # halves round up
    assert removal_count(4, 2, 0.5) == 2


def test_refit_consumer_matches_least_squares_and_beats_cutting() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 10, generator=g) @ torch.randn(10, 10, generator=g) + 0.5  # correlated
    w, b = torch.randn(6, 10, generator=g), torch.randn(6, generator=g)
    ones = torch.cat([x, torch.ones(400, 1)], 1)
    keep = torch.tensor([0, 2, 3, 5, 7, 8])
    w2, b2 = refit_consumer(w, b, ones.t() @ ones, keep, dampening=0.0)
    assert b2 is not None
    # brute force: lstsq of the dense outputs on [x_K, 1]
    sol = torch.linalg.lstsq(ones[:, [*keep.tolist(), 10]].double(), (x @ w.t() + b).double()).solution
    torch.testing.assert_close(w2.double(), sol[:-1].t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b2.double(), sol[-1], rtol=1e-4, atol=1e-4)
    dense = x @ w.t() + b
    refit_err = (x[:, keep] @ w2.t() + b2 - dense).pow(2).mean()
    cut_err = (x[:, keep] @ w[:, keep].t() + b - dense).pow(2).mean()
    assert refit_err < 0.5 * cut_err


# ---------------------------------------------------------------- surgery correctness


@pytest.mark.parametrize("case", ["llama-kv", "llama-q", "phi3-kv", "phi3-q", "neox", "bert",
                                  "cnn"])
def test_slicing_every_unit_kept_is_identity(case: str) -> None:
    model, batch = {
        "llama-kv": (_llama(), _tokens(1)[0]), "llama-q": (_llama(), _tokens(1)[0]),
        "phi3-kv": (_phi3(), _tokens(1)[0]), "phi3-q": (_phi3(), _tokens(1)[0]),
        "neox": (_neox(), _tokens(1)[0]),
        "bert": (_bert(), _tokens(1)[0]), "cnn": (_convnet(), _images(1)[0]),
    }[case]
    reference = _out(model, batch)
    kinds = ["channels", "neurons"] if case == "cnn" else ["heads", "neurons"]
    for kind in kinds:
        for group in _groups(model, kind, "queries" if case.endswith("-q") else "kv_groups"):
            prune_group(model, group.specs, torch.arange(group.n_units), group.n_units)
    torch.testing.assert_close(_out(model, batch), reference, rtol=0, atol=0)


def _zero_unit(model: nn.Module, group: UnitGroup, units: list[int]) -> None:
    """Zero every weight of ``units`` in every coupled tensor: they contribute exactly 0."""
    with torch.no_grad():
        for piece in group.slices:
            layer = model.get_submodule(piece.module)
            idx = piece.offset + unit_features(torch.tensor(units), piece.width)
            if piece.axis == "out":
                layer.weight[idx] = 0
                if layer.bias is not None:
                    layer.bias[idx] = 0
                if isinstance(layer, nn.BatchNorm2d):
                    layer.running_mean[idx] = 0
            else:
                layer.weight[:, idx] = 0


ZERO_CASES = [
    # (model, kind, gqa, sparsity, zeroed units per group)
    ("llama", "heads", "kv_groups", 0.5, [1]),
    ("llama", "heads", "queries", 0.5, [0, 3]),  # one query head in each of the 2 KV groups
    ("llama", "neurons", "kv_groups", 2 / 128, [5, 77]),
    ("phi3", "heads", "kv_groups", 0.5, [1]),  # k and v rows of group 1 in the fused qkv_proj
    ("phi3", "heads", "queries", 0.5, [1, 2]),
    ("phi3", "neurons", "kv_groups", 2 / 128, [5, 77]),  # gate and up rows of gate_up_proj
    ("neox", "heads", "kv_groups", 0.25, [2]),  # head 2's q, k and v rows, with their biases
    ("neox", "neurons", "kv_groups", 1 / 128, [40]),
    ("bert", "heads", "kv_groups", 0.25, [2]),
    ("bert", "neurons", "kv_groups", 1 / 128, [40]),
    ("cnn", "channels", "kv_groups", 0.1, [3]),  # round(0.8)=1 of 8, round(1.2)=1 of 12
    ("cnn", "neurons", "kv_groups", 1 / 16, [9]),
]


@pytest.mark.parametrize(("arch", "kind", "gqa", "sparsity", "units", "importance"), [
    (*case, importance) for case in ZERO_CASES for importance in ("magnitude", "activation", "obs")
    if not (importance == "obs" and case[1] == "channels")  # obs ranks Linear consumers only
])
def test_removing_zero_contributing_units_keeps_outputs(
    arch: str, kind: str, gqa: str, sparsity: float, units: list[int], importance: str
) -> None:
    model = {"llama": _llama, "phi3": _phi3, "neox": _neox, "bert": _bert, "cnn": _convnet}[arch]()
    batches = _images() if arch == "cnn" else _tokens()
    for group in _groups(model, kind, gqa):
        _zero_unit(model, group, units)
    reference = _out(model, batches[0])
    before = _params(model)
    step = {"method": "structured", "sparsity": sparsity, "units": [kind], "gqa": gqa,
            "importance": importance, "reconstruct": importance != "magnitude"}
    result = sl.compress(model, {"steps": [step]}, calibration=batches)
    assert _params(result.model) < before
    torch.testing.assert_close(_out(result.model, batches[0]), reference, rtol=1e-5, atol=1e-5)


def test_sparsity_zero_leaves_the_model_as_it_was() -> None:
    model, batch = _llama(), _tokens(1)[0]
    result = sl.compress(model, {"steps": [{"method": "structured", "sparsity": 0.0}]},
                         calibration=_tokens())
    assert result.steps[0].modules == []
    torch.testing.assert_close(_out(result.model, batch), _out(model, batch), rtol=0, atol=0)


# ---------------------------------------------------------------- sizes, config, FLOPs


def test_llama_gqa_groups_shapes_config_params_flops() -> None:
    model, batch = _llama(), _tokens(1)[0]
    step = {"method": "structured", "sparsity": 0.5, "importance": "magnitude", "reconstruct": False}
    pruned = sl.compress(model, {"steps": [step]}).model
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (2, 1, 16, 64)
    attn, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32) and mlp.down_proj.weight.shape == (64, 64)
    # per layer: one KV group (q 32 + k 16 + v 16 rows, o 32 columns) and 64 neurons × 3
    assert _params(model) - _params(pruned) == 2 * (32 * 64 * 2 + 16 * 64 * 2 + 64 * 64 * 3)
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(c.to_dict())).eval()
    assert _params(fresh) == _params(pruned)
    assert _flops(pruned, batch) == _flops(fresh, batch) < _flops(model, batch)
    assert torch.isfinite(_out(pruned, batch)).all()


@pytest.mark.parametrize("gqa", ["kv_groups", "queries"])
def test_phi3_fused_heads_and_neurons_shapes_config_params_flops(gqa: str) -> None:
    """The fused layers lose every run of the removed units: the pruned model is the one
    Phi-3's own config describes at the new sizes (parameters, FLOPs), and it runs."""
    model, batch = _phi3(), _tokens(1)[0]
    step = {"method": "structured", "sparsity": 0.5, "importance": "magnitude",
            "reconstruct": False, "gqa": gqa}
    pruned = sl.compress(model, {"steps": [step]}).model
    c = pruned.config
    heads, kv = (2, 1) if gqa == "kv_groups" else (2, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (
        heads, kv, 16, 64)
    attn, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    assert attn.qkv_proj.weight.shape == ((heads + 2 * kv) * 16, 64)
    assert attn.o_proj.weight.shape == (64, heads * 16)
    assert mlp.gate_up_proj.weight.shape == (128, 64) and mlp.down_proj.weight.shape == (64, 64)
    assert all(layer.self_attn.config is c for layer in pruned.model.layers)  # shared again
    fresh = Phi3ForCausalLM(Phi3Config.from_dict(c.to_dict())).eval()
    assert _params(fresh) == _params(pruned) < _params(model)
    assert _flops(pruned, batch) == _flops(fresh, batch) < _flops(model, batch)
    assert torch.isfinite(_out(pruned, batch)).all()


def test_phi3_kept_rows_are_the_kept_units_of_each_run() -> None:
    """Brute force on the fused qkv_proj: the rows left are exactly the kept group's query,
    key and value rows, in order."""
    model = _phi3()
    step = {"method": "structured", "sparsity": 0.5, "units": ["heads"], "importance": "magnitude",
            "reconstruct": False}
    pruned = sl.compress(model, {"steps": [step]}).model
    for before, after in zip(model.model.layers, pruned.model.layers, strict=True):
        w, cut = before.self_attn.qkv_proj.weight, after.self_attn.qkv_proj.weight
        q, k, v = w[:64].reshape(2, 32, 64), w[64:96].reshape(2, 16, 64), w[96:].reshape(2, 16, 64)
        kept = [g for g in range(2) if torch.equal(q[g], cut[:32])]
        assert len(kept) == 1
        g = kept[0]
        torch.testing.assert_close(cut, torch.cat([q[g], k[g], v[g]]), rtol=0, atol=0)
        o = before.self_attn.o_proj.weight[:, 32 * g:32 * (g + 1)]
        torch.testing.assert_close(after.self_attn.o_proj.weight, o, rtol=0, atol=0)


def test_llama_neuron_flops_drop_by_the_removed_matmuls() -> None:
    model, batch = _llama(), _tokens(1)[0]
    step = {"method": "structured", "sparsity": 0.25, "units": ["neurons"], "importance": "magnitude",
            "reconstruct": False}
    pruned = sl.compress(model, {"steps": [step]}).model
    tokens, removed = batch["input_ids"].numel(), 32
    # gate, up and down each lose 32 × 64 weights per layer; a matmul costs 2 FLOPs per MAC
    assert _flops(model, batch) - _flops(pruned, batch) == 2 * tokens * 3 * 64 * removed * 2


def test_llama_query_heads_within_groups_keep_gqa_valid() -> None:
    model, batch = _llama(), _tokens(1)[0]
    step = {"method": "structured", "sparsity": 0.5, "units": ["heads"], "gqa": "queries"}
    pruned = sl.compress(model, {"steps": [step]}, calibration=_tokens()).model
    c = pruned.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (2, 2)
    assert c.num_attention_heads % c.num_key_value_heads == 0
    assert pruned.model.layers[1].self_attn.num_key_value_groups == 1
    fresh = LlamaForCausalLM(LlamaConfig.from_dict(c.to_dict())).eval()
    assert _flops(pruned, batch) == _flops(fresh, batch)


def test_bert_heads_and_neurons_shapes_and_flops() -> None:
    model, batch = _bert(), _tokens(1)[0]
    pruned = sl.compress(model, {"steps": [{"method": "structured", "sparsity": 0.5}]},
                         calibration=_tokens()).model
    att = pruned.encoder.layer[0].attention
    assert att.self.query.weight.shape == (32, 64) and att.output.dense.weight.shape == (64, 32)
    assert (att.self.num_attention_heads, att.self.all_head_size) == (2, 32)
    assert pruned.config.intermediate_size == 64
    assert pruned.encoder.layer[1].output.dense.weight.shape == (64, 64)
    assert _params(model) - _params(pruned) == 2 * (3 * (32 * 64 + 32) + 64 * 32 + 64 * 64 * 2 + 64)
    assert _flops(pruned, batch) < 0.75 * _flops(model, batch)


def test_cnn_channels_with_batchnorm_and_flatten() -> None:
    model, batch = _convnet(), _images(1)[0]
    step = {"method": "structured", "sparsity": 0.5, "units": ["channels", "neurons"]}
    pruned = sl.compress(model, {"steps": [step]}, calibration=_images()).model
    assert pruned.conv1.weight.shape == (4, 3, 3, 3) and pruned.bn.num_features == 4
    assert pruned.conv2.weight.shape == (6, 4, 3, 3) and pruned.fc.weight.shape == (8, 6 * 16)
    assert pruned.head.weight.shape == (5, 8)
    assert _flops(pruned, batch) < 0.5 * _flops(model, batch)
    assert _out(pruned, batch).shape == (4, 5)


# ---------------------------------------------------------------- save / load and generation


@pytest.mark.parametrize("arch", ["llama", "phi3", "neox", "bert", "digits"])
def test_save_load_gives_identical_outputs(arch: str, tmp_path) -> None:
    if arch == "digits":
        torch.manual_seed(0)
        model, batches = DigitsCNN().eval(), [torch.rand(4, 1, 8, 8) for _ in range(2)]
        step = {"method": "structured", "sparsity": 0.5, "units": ["channels", "neurons"]}
    else:
        model, batches = {"llama": _llama, "phi3": _phi3, "neox": _neox, "bert": _bert}[arch](), _tokens()
        step = {"method": "structured", "sparsity": 0.5}
    pruned = sl.compress(model, {"steps": [step]}, calibration=batches).model
    sl.save(pruned, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck")
    assert _params(loaded) == _params(pruned) < _params(model)
    torch.testing.assert_close(_out(loaded, batches[0]), _out(pruned, batches[0]), rtol=0, atol=0)


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "phi3", "neox"])
def test_pruned_model_generates_with_kv_cache(arch: str) -> None:
    model = {"llama": _llama, "phi3": _phi3, "neox": _neox}[arch]()
    pruned = sl.compress(model, {"steps": [{"method": "structured", "sparsity": 0.5}]},
                         calibration=_tokens()).model
    ids = _tokens(1)[0]["input_ids"][:1, :5]
    cached = pruned.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    torch.testing.assert_close(cached, _greedy_without_cache(pruned, ids, 6))


# ---------------------------------------------------------------- errors, before any change


ERRORS = [
    ("llama", {"sparsity": 1.0}, "structured.sparsity"),
    ("llama", {"sparsity": -0.1}, "structured.sparsity"),
    ("llama", {"units": []}, "structured.units"),
    ("llama", {"units": ["heads", "heads"]}, "structured.units"),
    ("llama", {"units": ["channels"]}, "structured.units"),
    ("llama", {"sparsity": 0.8, "units": ["heads"]}, "structured.sparsity"),  # both KV groups
    ("llama-mha", {"units": ["heads"], "gqa": "queries", "sparsity": 0.6}, "structured.sparsity"),
    ("llama", {"targets": {"include": ["model.layers.0.*"]}}, "structured.targets"),
    ("bert", {"sparsity": 0.9, "units": ["neurons"]}, None),  # 115 of 128 removed: allowed
    ("cnn", {"units": ["heads"]}, "structured.units"),
    ("residual", {"units": ["channels"]}, "structured.units"),
    ("gpt2", {"units": ["heads"]}, "structured.units"),  # Conv1D c_attn: not a layout known here
    ("llama", {"importance": "sparse"}, "structured.importance"),
]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        return self.head((h + self.conv2(h)).mean((2, 3)))


def _error_model(arch: str) -> nn.Module:
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)).eval()
    return {"llama": _llama, "llama-mha": lambda: _llama(kv=4), "bert": _bert,
            "cnn": _convnet, "residual": Residual}[arch]()


@pytest.mark.parametrize(("arch", "fields", "match"), ERRORS)
def test_errors_name_the_field_and_leave_the_model_untouched(arch: str, fields: dict, match) -> None:
    model = _error_model(arch)
    before = _state(model)
    step = {"method": "structured", "importance": "magnitude", "reconstruct": False, **fields}
    if match is None:
        sl.compress(model, {"steps": [step]})
        return
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        sl.compress(model, {"steps": [step]}, inplace=True)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_activation_importance_without_calibration_is_refused() -> None:
    model = _llama()
    with pytest.raises(ValueError, match="calibration"):
        sl.compress(model, {"steps": [{"method": "structured", "importance": "activation"}]})
    with pytest.raises(ValueError, match="calibration"):
        sl.compress(model, {"steps": [{"method": "structured", "importance": "magnitude"}]})
    sl.compress(model, {"steps": [{"method": "structured", "importance": "magnitude",
                                   "reconstruct": False}]})


def test_applies_to_says_whether_the_unit_kinds_exist() -> None:
    from slimline.prune.structured import StructuredConfig

    assert StructuredConfig().applies_to(_llama()) and StructuredConfig().applies_to(_bert())
    assert not StructuredConfig().applies_to(_convnet())  # no heads
    assert StructuredConfig(units=("channels", "neurons")).applies_to(_convnet())
    assert not StructuredConfig(units=("channels",)).applies_to(Residual())
