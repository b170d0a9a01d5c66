"""``distill``: its losses against textbook references, recovery that beats doing nothing,
exact sparsity, frozen quantized layers, order rules and errors raised before training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimline as sl
from slimline.core.batches import mean_pool
from slimline.quantize.qlinear import QuantLinear
from slimline.train.losses import kl_with_temperature, layer_map, pooled_cosine_loss
from slimline.train.recompute import checkpointing_on


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend
    yield
    torch.set_num_threads(threads)


# --- losses --------------------------------------------------------------------------------------


def test_kl_with_temperature_matches_kl_div_over_real_tokens() -> None:
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    T = 2.5
    rows = [F.kl_div((s[b, i] / T).log_softmax(-1), (t[b, i] / T).softmax(-1), reduction="sum")
            for b in range(2) for i in range(5) if mask[b, i]]  # fmt: skip
    expected = torch.stack(rows).mean() * T * T
    torch.testing.assert_close(kl_with_temperature(s, t, T, mask), expected)


def test_t_squared_keeps_the_gradient_scale_at_high_temperature() -> None:
    # Hinton et al. eq. 3-4: at high T, ∂(T²·KL)/∂s → (s - t)/V for zero-mean logits.
    V = 10
    s = torch.randn(V)
    t = torch.randn(V)
    s, t = (s - s.mean()).requires_grad_(True), t - t.mean()
    kl_with_temperature(s, t, 1000.0, None).backward()  # the correction is O(1/T)
    torch.testing.assert_close(s.grad, (s.detach() - t) / V, rtol=5e-3, atol=1e-5)


def test_pooled_cosine_ignores_padding() -> None:
    s, t = torch.randn(3, 6, 4), torch.randn(3, 6, 4)
    lengths = [6, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    expected = torch.stack([
        1 - F.cosine_similarity(s[b, :n].mean(0), t[b, :n].mean(0), dim=0)
        for b, n in enumerate(lengths)
    ]).mean()  # fmt: skip
    torch.testing.assert_close(pooled_cosine_loss(s, t, mask), expected)
    s2 = s.clone()
    s2[mask == 0] = 100.0  # what is under the padding does not count
    torch.testing.assert_close(pooled_cosine_loss(s2, t, mask), expected)


def test_layer_map_is_tinyberts_uniform_map() -> None:
    # TinyBERT-4 from BERT-12 (arXiv 1909.10351 §4.2): student layer m learns teacher 3m,
    # with the embeddings (index 0) matched to the embeddings.
    assert layer_map(5, 13) == [0, 3, 6, 9, 12]
    assert layer_map(3, 3) == [0, 1, 2]


# --- recovery ------------------------------------------------------------------------------------


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # initializer_range 0.2: at the default 0.02 a random encoder's pooled output hardly
    # depends on its layers, and pruning them changes nothing measurable.
    config = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64,
                        initializer_range=0.2)  # fmt: skip
    return BertModel(config).eval()


def _text_batches(n: int, seed: int, padded: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        if padded:
            mask[0, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _cosine(a, b, batches) -> float:
    with torch.no_grad():
        sims = [F.cosine_similarity(
            mean_pool(a(**x).last_hidden_state, x["attention_mask"]),
            mean_pool(b(**x).last_hidden_state, x["attention_mask"]), dim=-1).mean()
            for x in batches]  # fmt: skip
    return float(torch.stack(sims).mean())


def _noisy(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """The model with Gaussian noise of ``scale`` × each Linear weight's std added: a damage
    distillation can undo exactly (the teacher's weights are a minimum of its loss)."""
    g = torch.Generator().manual_seed(5)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in out.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.add_(scale * m.weight.std() * torch.randn(m.weight.shape, generator=g))
    return out


def test_distill_undoes_most_of_a_damage_on_held_out_text() -> None:
    from slimline.core.registry import StepContext
    from slimline.distill.distill import DistillConfig, apply_distill

    model, train, test = _tiny_bert(), _text_batches(16, 1), _text_batches(4, 2)
    student = _noisy(model, 0.3)
    before = 1 - _cosine(student, model, test)  # doing nothing
    outcome = apply_distill(student, DistillConfig(steps=30, lr=1e-3),
                            StepContext(training=train, original=model))  # fmt: skip
    # The pooled-cosine distance on unseen sentences at least halves (measured: to a third).
    assert 1 - _cosine(student, model, test) < 0.5 * before
    assert "cosine output term" in outcome.notes[1]


def test_distill_recovers_a_structured_pruned_encoder_on_its_training_text() -> None:
    model, train = _tiny_bert(), _text_batches(8, 1)
    prune = {"method": "structured", "sparsity": 0.5, "units": ["heads", "neurons"]}
    pruned = sl.compress(model, {"steps": [prune]}, calibration=train).model
    distill = {"method": "distill", "steps": 20, "lr": 1e-3}
    result = sl.compress(model, {"steps": [prune, distill]}, calibration=train)
    assert _cosine(result.model, model, train) > _cosine(pruned, model, train)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _kl(student, teacher, batches) -> float:
    with torch.no_grad():
        return float(sum(kl_with_temperature(student(**b).logits, teacher(**b).logits, 1.0,
                                             b["attention_mask"]) for b in batches) / len(batches))  # fmt: skip


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n != "lm_head"}  # fmt: skip


def test_distill_after_wanda_lowers_kl_and_keeps_every_pruned_weight_zero() -> None:
    model, train = _tiny_llama(), _text_batches(12, 1)
    wanda = {"method": "wanda", "sparsity": 0.5}
    pruned = sl.compress(model, {"steps": [wanda]}, calibration=train).model
    recipe = {"steps": [wanda, {"method": "distill", "steps": 30, "lr": 3e-3,
                                "hidden_weight": 0.5, "eval_fraction": 0.2}]}  # fmt: skip
    result = sl.compress(model, recipe, calibration=train)
    assert _kl(result.model, model, train) < _kl(pruned, model, train)
    before, after = _linear_weights(pruned), _linear_weights(result.model)
    for name, w in before.items():
        assert torch.equal(after[name][w == 0], torch.zeros(int((w == 0).sum()))), name
        assert not torch.equal(after[name], w), name  # the kept weights did train


def test_norms_and_biases_trains_only_those() -> None:
    model, train = _tiny_bert(), _text_batches(3, 1)
    step = {"method": "distill", "steps": 5, "lr": 1e-2, "trainable": "norms_and_biases",
            "teacher": None}  # fmt: skip
    pruned = sl.compress(model, {"steps": [{"method": "magnitude", "sparsity": 0.5}]}).model
    out = sl.compress(pruned, {"steps": [step]}, calibration=train).model
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, pruned.state_dict()[k])}
    assert changed and all(k.endswith("bias") or "LayerNorm" in k for k in changed), changed
    assert any("LayerNorm.weight" in k for k in changed)


def test_quantized_layers_stay_frozen() -> None:
    model, train = _tiny_llama(), _text_batches(3, 1)
    rtn = {"method": "rtn", "bits": 4, "group_size": 32}
    quantized = sl.compress(model, {"steps": [rtn]}).model
    out = sl.compress(quantized, {"steps": [{"method": "distill", "steps": 3, "lr": 1e-2}]},
                      calibration=train).model  # fmt: skip
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear):
            for key, value in module.state_dict().items():
                assert torch.equal(out.get_submodule(name).state_dict()[key], value)
    norm = "model.norm.weight"
    assert not torch.equal(out.state_dict()[norm], quantized.state_dict()[norm])  # others train


def test_quantized_train_trains_gptq_layers_through_their_grid() -> None:
    model, train = _tiny_llama(), _text_batches(12, 1)
    gptq = {"method": "gptq", "bits": 4, "group_size": 32}
    only_packed = {"include": ["*.self_attn.*", "*.mlp.*"]}  # nothing else trains
    step = {"method": "distill", "steps": 60, "lr": 3e-3, "quantized": "train", "targets": only_packed}
    start = sl.compress(model, {"steps": [gptq]}, calibration=train).model
    trained = sl.compress(model, {"steps": [gptq, step]}, calibration=train)
    assert _kl(trained.model, model, train) < 0.8 * _kl(start, model, train)
    assert any("packed layers trained" in n for n in trained.steps[-1].notes)
    moved = 0
    for name, packed in start.named_modules():
        if isinstance(packed, QuantLinear):
            after = trained.model.get_submodule(name)
            assert isinstance(after, QuantLinear)  # packed again, on the same grid
            assert (after.bits, after.group_size, after.symmetric) == (4, 32, packed.symmetric)
            assert not torch.equal(after.scales, packed.scales), name  # its step sizes trained
            moved += not torch.equal(after.qweight, packed.qweight)
        else:
            for key, value in packed.named_parameters(recurse=False):  # not targeted: untouched
                assert torch.equal(getattr(trained.model.get_submodule(name), key), value), name
    assert moved > 0  # and codes moved
    with pytest.raises(ValueError, match="matches only QuantLinear"):  # frozen: nothing to train
        sl.compress(model, {"steps": [gptq, {**step, "quantized": "frozen"}]}, calibration=train)
def test_quantized_train_round_trips_an_untrained_packed_model_exactly() -> None:
    model, train = _tiny_llama(), _text_batches(2, 1)
    packed = sl.compress(model, {"steps": [{"method": "rtn", "bits": 3, "group_size": 32}]}).model
    step = {"method": "distill", "steps": 1, "lr": 1e-12, "scale_lr": 0.0, "quantized": "train"}
    out = sl.compress(packed, {"steps": [step]}, calibration=train).model
    for name, layer in packed.named_modules():
        if isinstance(layer, QuantLinear):
            for key, value in layer.state_dict().items():
                assert torch.equal(out.get_submodule(name).state_dict()[key], value), (name, key)


def test_quantized_train_needs_trainable_all() -> None:
    with pytest.raises(ValueError, match="quantized"):
        sl.Recipe.from_dict({"steps": [{"method": "distill", "quantized": "train",
                                        "trainable": "lora"}]})  # fmt: skip


# --- order, errors -------------------------------------------------------------------------------


def test_order_rules_place_distill_after_structure_and_before_compile() -> None:
    ok = sl.Recipe.from_dict({"steps": [{"method": "structured"}, {"method": "distill"},
                                        {"method": "int8_dynamic"}, {"method": "compile"}]})  # fmt: skip
    assert [s.method for s in ok.steps][1] == "distill"
    with pytest.raises(ValueError, match="compil"):
        sl.Recipe.from_dict({"steps": [{"method": "distill"}, {"method": "compile"},
                                       {"method": "int8_dynamic"}]})  # fmt: skip


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bad_input_raises_before_training(tmp_path) -> None:
    model = _tiny_llama()
    before = _state(model)
    step = {"method": "distill", "steps": 2}
    with pytest.raises(ValueError, match="needs training data"):
        sl.compress(model, {"steps": [step]})
    nan = _text_batches(2, 1)
    nan[1]["noise"] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match=r"training\[1\]: contains NaN"):
        sl.compress(model, {"steps": [step]}, training=nan)
    other = _tiny_llama()
    other.resize_token_embeddings(160)
    sl.save(other, tmp_path / "teacher")
    with pytest.raises(ValueError, match="distill.teacher: vocabulary of 160 differs .* 128"):
        sl.compress(model, {"steps": [{**step, "teacher": str(tmp_path / "teacher")}]},
                    calibration=_text_batches(2, 1), inplace=True)  # fmt: skip
    with pytest.raises(ValueError, match="distill.temperature"):
        sl.compress(model, {"steps": [{**step, "temperature": 0.0}]}, calibration=nan[:1])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_loss_turning_nan_stops_with_the_step_and_leaves_the_model_as_it_was() -> None:
    model = _tiny_llama()
    before = _state(model)
    # An absurd SGD step sends the weights to inf: the loss of the next step is not finite.
    step = {"method": "distill", "steps": 5, "lr": 1e30, "optimizer": "sgd",
            "max_grad_norm": None}  # fmt: skip
    with pytest.raises(ValueError, match=r"distill: the loss became nan at step [1-4]"):
        sl.compress(model, {"steps": [step]}, calibration=_text_batches(2, 1), inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_teacher_is_the_model_before_the_recipe_even_in_place() -> None:
    model, train = _tiny_llama(), _text_batches(3, 1)
    original = copy.deepcopy(model)
    wanda = {"method": "wanda", "sparsity": 0.5}
    recipe = {"steps": [wanda, {"method": "distill", "steps": 10, "lr": 1e-3}]}
    pruned = sl.compress(model, {"steps": [wanda]}, calibration=train).model
    result = sl.compress(model, recipe, calibration=train, inplace=True)
    assert result.model is model
    assert _kl(model, original, train) < _kl(pruned, original, train)


def test_the_teacher_cache_runs_the_teacher_once_per_batch_and_trains_the_same() -> None:
    from slimline.core.registry import StepContext
    from slimline.distill.distill import DistillConfig, apply_distill

    model, train = _tiny_bert(), _text_batches(3, 1)
    students = []
    for cache_mb in (0, 64):
        student, calls = _noisy(model, 0.3), []
        hook = model.register_forward_hook(lambda *_, seen=calls: seen.append(1))  # teacher runs
        cfg = DistillConfig(steps=9, lr=1e-3, hidden_weight=1.0, teacher_cache_mb=cache_mb)
        apply_distill(student, cfg, StepContext(training=train, original=model))
        hook.remove()
        students.append((len(calls), student))
    (uncached, plain), (cached, reused) = students
    assert (uncached, cached) == (2 + 9, 3)  # shape check, projections, every step; once a batch
    for (name, a), b in zip(plain.named_parameters(), reused.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_computes_the_same_training() -> None:
    model, train = _tiny_llama(), _text_batches(3, 1)
    wanda = {"method": "wanda", "sparsity": 0.5}

    def run(checkpointing: bool):
        step = {"method": "distill", "steps": 4, "lr": 1e-3, "checkpointing": checkpointing}
        return sl.compress(model, {"steps": [wanda, step]}, calibration=train)

    plain, recomputed = run(False), run(True)
    assert plain.steps[-1].notes == recomputed.steps[-1].notes  # same losses, 4 digits
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(recomputed.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert not checkpointing_on(recomputed.model)  # switched off after the step
    with pytest.raises(ValueError, match="distill.checkpointing"):
        sl.compress(_plain_mlp(), {"steps": [{"method": "distill", "checkpointing": True}]},
                    calibration=[torch.randn(4, 8)])  # fmt: skip


def _plain_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


# --- trainable: lora -----------------------------------------------------------------------------


def test_lora_after_wanda_merges_the_trained_model_and_keeps_every_zero() -> None:
    model, train = _tiny_llama(), _text_batches(3, 1)
    wanda = {"method": "wanda", "sparsity": 0.5}
    pruned = sl.compress(model, {"steps": [wanda]}, calibration=train).model
    step = {"method": "distill", "steps": 4, "lr": 1e-2, "trainable": "lora", "lora_r": 2,
            "lora_alpha": 4.0}  # fmt: skip
    result = sl.compress(model, {"steps": [wanda, step]}, calibration=train)
    out = result.model
    from slimline.peft.layer import LoraLinear

    assert not any(isinstance(m, LoraLinear) for m in out.modules())  # merged
    assert all(p.requires_grad for p in out.parameters())  # the flags the model had
    before, after = _linear_weights(pruned), _linear_weights(out)
    assert result.steps[-1].modules == sorted(before)  # the adapted layers, not lora_A names
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0), name  # exactly the pruned zeros
        assert not torch.equal(after[name], w), name
    assert "(lora)" in result.steps[-1].notes[0]


def test_lora_failure_removes_the_adapters_even_in_place() -> None:
    model = _tiny_llama()
    model.model.norm.weight.requires_grad_(False)  # a flag to keep
    before = _state(model)
    step = {"method": "distill", "steps": 5, "lr": 1e30, "optimizer": "sgd",
            "max_grad_norm": None, "trainable": "lora"}  # fmt: skip
    with pytest.raises(ValueError, match="distill: the loss became"):
        sl.compress(model, {"steps": [step]}, calibration=_text_batches(2, 1), inplace=True)
    from slimline.peft.layer import LoraLinear

    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert _state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.model.norm.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.norm.weight")


def test_fields_that_do_not_fit_the_model_raise_before_training() -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32)).eval()  # fmt: skip
    before = _state(bert)
    with pytest.raises(ValueError, match="distill.output_loss: 'kl' needs a model that answers logits"):
        sl.compress(bert, {"steps": [{"method": "distill", "output_loss": "kl"}]},
                    calibration=_text_batches(2, 1), inplace=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"distill.output_loss: 'cosine' pools token states"):
        sl.compress(_plain_mlp(), {"steps": [{"method": "distill", "output_loss": "cosine"}]},
                    calibration=[torch.randn(4, 8)])  # fmt: skip
    with pytest.raises(ValueError, match="distill.lora_r: must be ≥ 1"):
        sl.compress(bert, {"steps": [{"method": "distill", "trainable": "lora", "lora_r": 0}]},
                    calibration=_text_batches(2, 1))  # fmt: skip
    mlp = _plain_mlp()
    with pytest.raises(ValueError, match="distill.checkpointing"):
        sl.compress(mlp, {"steps": [{"method": "distill", "checkpointing": True,
                                     "trainable": "lora"}]},
                    calibration=[torch.randn(4, 8)], inplace=True)  # fmt: skip
    assert all(isinstance(m, (torch.nn.Linear, torch.nn.ReLU, torch.nn.Sequential))
               for m in mlp.modules())  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())
