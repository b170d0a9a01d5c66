"""The ``speculative`` recipe step: its fields, its place in a recipe, bad input refused before
anything changes, drafts refused with the reason, and sl.save → sl.load."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import slimline as sl
from slimline.speculative.speculative import SpeculativeConfig
from tests.speculative.helpers import greedy, prompts, saved, small_like, speculative


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("fields", "message"), [
    ({"gamma": 0}, "speculative.gamma: the draft length must be >= 1"),
    ({"mode": "medusa"}, "speculative.mode: 'medusa' is not one of"),
    ({"mode": "draft"}, "speculative.draft: mode 'draft' needs a draft model"),
    ({"draft": "code-llama-tiny"}, "speculative.draft: only mode 'draft'"),
    ({"mode": "self", "skip_layers": [0]}, "speculative.skip_layers: .*block 0 always runs"),
    ({"mode": "self", "n_skip": 0}, "speculative.n_skip: must be >= 1"),
    ({"n_skip": 1}, "speculative.n_skip: only mode 'self'"),
    ({"gamma": 8, "max_gamma": 4}, "speculative.max_gamma"),
    ({"ngram": 0}, "speculative.ngram"),
    ({"targets": {"include": ["*"]}}, "speculative.targets"),
])  # fmt: skip
def test_bad_fields_are_refused_by_name(fields, message, tiny_llama) -> None:
    before = _state(tiny_llama)
    with pytest.raises(ValueError, match=message):
        sl.compress(tiny_llama, {"steps": [{"method": "speculative", **fields}]}, inplace=True)
    assert "generate" not in vars(tiny_llama)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


@pytest.mark.parametrize("fields", [
    {"mode": "draft", "draft": "/no/such/draft"},
    {"mode": "self", "n_skip": 2},  # 2 blocks: only block 1 may be skipped
    {"mode": "self", "skip_layers": [5]},
])  # fmt: skip
def test_impossible_plans_are_refused_before_anything_changes(fields, tiny_llama) -> None:
    before = _state(tiny_llama)
    recipe = {"steps": [{"method": "rtn", "bits": 8}, {"method": "speculative", **fields}]}
    with pytest.raises(ValueError, match="speculative"):
        sl.compress(tiny_llama, recipe, calibration=[torch.randint(0, 128, (1, 8))], inplace=True)
    assert "generate" not in vars(tiny_llama)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


def test_models_that_are_not_causal_lms_are_refused(tiny_mlp) -> None:
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)).eval()
    for model in (tiny_mlp, bert):
        assert not SpeculativeConfig().applies_to(model)
        with pytest.raises(ValueError, match=r"step 0 \(speculative\).*(causal LM|generat)"):
            sl.compress(model, {"steps": [{"method": "speculative"}]})


def test_self_mode_needs_calibration_unless_blocks_are_given(tiny_llama) -> None:
    with pytest.raises(ValueError, match="needs calibration data"):
        sl.compress(tiny_llama, {"steps": [{"method": "speculative", "mode": "self"}]})
    assert not SpeculativeConfig(mode="self", skip_layers=(1,)).requires_calibration()


def test_place_in_a_recipe() -> None:
    sl.Recipe.from_dict({"steps": [{"method": "rtn"}, {"method": "half"}, {"method": "kv_cache"},
                                   {"method": "speculative"}, {"method": "compile"}]})
    for before, after in [("speculative", "kv_cache"), ("speculative", "rtn"),
                          ("compile", "speculative")]:
        with pytest.raises(ValueError, match="must come before"):
            sl.Recipe.from_dict({"steps": [{"method": before}, {"method": after}]})
    with pytest.raises(ValueError, match="a second speculate step"):
        sl.Recipe.from_dict({"steps": [{"method": "speculative"}, {"method": "speculative"}]})


# ---------------------------------------------------------------- drafts


def test_a_draft_with_another_vocabulary_size_is_refused(tiny_llama, tmp_path) -> None:
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="vocabulary has 100 tokens and the target's 128"):
        speculative(tiny_llama, mode="draft", draft=saved(other, tmp_path / "d"))


def test_a_draft_whose_tokenizer_maps_tokens_elsewhere_is_refused(tmp_path) -> None:
    from slimline.models import load_builtin
    from slimline.sources import resolve_model

    built = load_builtin("code-llama-tiny", size="small")
    target = resolve_model(saved_with(built.model, built.tokenizer, tmp_path / "t")).model
    draft = small_like(target)
    same = saved_with(draft, built.tokenizer, tmp_path / "same")
    fast = speculative(target, mode="draft", draft=same)  # same tokenizer: accepted
    ids = built.batches("test", batch_size=1, limit=1)[0]["input_ids"][:, :12]
    assert torch.equal(greedy(fast, ids), greedy(target, ids))

    swapped = tmp_path / "swapped"
    saved_with(draft, built.tokenizer, swapped)
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer maps 2 token"):
        speculative(target, mode="draft", draft=str(swapped))


def saved_with(model: torch.nn.Module, tokenizer, where) -> str:
    sl.save(model, where, tokenizer=tokenizer)
    return str(where)


# ---------------------------------------------------------------- self mode: which blocks


def test_self_mode_skips_the_blocks_layer_drop_would_drop(token_batches) -> None:
    """The same Block Influence: with block 0 excluded, layer_drop's choice of n blocks is the
    set the self-draft skips."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=5, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    fast_result = sl.compress(model, {"steps": [{"method": "speculative", "mode": "self"}]},
                              calibration=token_batches)
    skipped = fast_result.model.slimline_recipe["steps"][0]["skip_layers"]
    dropped = sl.compress(model, {"steps": [{"method": "layer_drop", "n_layers": 2, "targets": {
        "exclude": ["model.layers.0"]}}]}, calibration=token_batches).steps[0].modules
    assert len(skipped) == 2  # half of 5 blocks, rounded down
    assert [f"model.layers.{i}" for i in skipped] == dropped
    ids = prompts(128)[2]
    assert torch.equal(greedy(fast_result.model, ids, 16), greedy(model, ids, 16))


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("mode", ["prompt_lookup", "self", "draft"])
def test_save_load_keeps_the_step(mode: str, tiny_gpt2, token_batches, tmp_path) -> None:
    fields = {"draft": saved(small_like(tiny_gpt2), tmp_path / "draft")} if mode == "draft" else {}
    fast = speculative(tiny_gpt2, calibration=token_batches, mode=mode, gamma=3, **fields)
    sl.save(fast, tmp_path / "ck")
    step = json.loads((tmp_path / "ck" / "recipe.json").read_text())["recipe"]["steps"][0]
    assert step["method"] == "speculative" and step["mode"] == mode and step["gamma"] == 3
    if mode == "self":
        assert step["skip_layers"] == [1]  # chosen on the calibration data, recorded
    if mode == "draft":
        assert step["draft"] == str((tmp_path / "draft").resolve())
    loaded = sl.load(tmp_path / "ck")  # no calibration data needed
    ids = prompts(128)[2]
    assert torch.equal(greedy(loaded, ids), greedy(tiny_gpt2, ids))
    assert loaded.speculative_last.drafted > 0 and loaded.speculative_stats.calls == 1
    # the checkpoint holds the target's tensors only, readable by transformers as they are
    assert set(sl.load(tmp_path / "ck").state_dict()) == set(tiny_gpt2.state_dict())


def test_after_kv_cache_it_verifies_through_the_quantized_cache(tiny_llama, tmp_path) -> None:
    cached = sl.compress(tiny_llama, {"steps": [{"method": "kv_cache"}]}).model
    both = sl.compress(tiny_llama, {"steps": [{"method": "kv_cache"},
                                              {"method": "speculative", "gamma": 3}]}).model
    for ids in prompts(128):
        out = both.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            return_dict_in_generate=True)
        assert torch.equal(out.sequences, greedy(cached, ids))
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert type(cache).__name__ == "QuantizedKVCache"
    sl.save(both, tmp_path / "ck")
    ids = prompts(128)[2]
    assert torch.equal(greedy(sl.load(tmp_path / "ck"), ids), greedy(cached, ids))


def test_applying_again_keeps_one_wrapper(tiny_llama) -> None:
    once = speculative(tiny_llama, gamma=3)
    twice = sl.compress(once, {"steps": [{"method": "speculative", "gamma": 2}]}).model
    assert twice.slimline_speculative.inner is None  # transformers' generate underneath
    ids = prompts(128)[2]
    assert torch.equal(greedy(twice, ids), greedy(tiny_llama, ids))
    assert twice.speculative_last.calls == 1
