"""``unpad``: a padded batch through the packed layers against each sentence run alone (a batch
of one has no padding: the textbook answer), and every call it leaves to the model's forward."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import slimline as sl
from slimline.compile import varlen_attention as varlen
from slimline.compile.unpad import WRITTEN_OUT_MAX, attention, forwards, pack_index, scatter

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 96


def _bert(attn: str = "sdpa") -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=96, attn_implementation=attn)).eval()


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=70, pad_token_id=1, num_labels=3)).eval()


def _batch(lengths: list[int], left: bool = False, pad: int = 0) -> dict[str, torch.Tensor]:
    """Sentences of ``lengths`` tokens padded to the longest (on the left with ``left``)."""
    g = torch.Generator().manual_seed(len(lengths))
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), pad)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, n in enumerate(lengths):
        span = slice(longest - n, longest) if left else slice(0, n)
        ids[row, span] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "token_type_ids": torch.zeros_like(ids)}


def unpadded(model: nn.Module, *steps: dict[str, Any], calibration: Any = None) -> nn.Module:
    recipe = {"steps": [*steps, {"method": "unpad"}]}
    return sl.compress(model, recipe, calibration=calibration).model


def calls(model: nn.Module) -> int:
    found = forwards(model)
    assert len(found) == 1
    return found[0].calls


def real_tokens(fast: nn.Module, model: nn.Module, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The real tokens' last_hidden_state (T, hidden) from ``fast`` and from the padded
    ``model``."""
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        return fast(**batch).last_hidden_state[keep], model(**batch).last_hidden_state[keep]


def alone(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each row's real tokens run by themselves: last_hidden_state (n, hidden) per row."""
    out = []
    with torch.no_grad():
        for row in range(len(batch["input_ids"])):
            keep = batch["attention_mask"][row].bool()
            one = {k: v[row][keep][None] for k, v in batch.items()}
            out.append(model(**one).last_hidden_state[0])
    return out


@pytest.fixture(params=["varlen kernel", "padded attention"])
def attention_path(request: pytest.FixtureRequest,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[int]]:
    """Which attention the packed layers run, and a list that grows by one each time they call
    the varlen kernel; under "padded attention" the kernel is declared unavailable, so attention
    runs in torch on the padded layout."""
    calls: list[int] = []
    run = varlen.varlen_attention

    def counted(*args: Any) -> torch.Tensor:
        calls.append(1)
        return run(*args)

    monkeypatch.setattr(varlen, "varlen_attention", counted)
    if request.param == "padded attention":
        monkeypatch.setattr(varlen, "unsupported", lambda *_: "switched off by the test")
    elif varlen.library_problem():
        pytest.skip(varlen.library_problem())
    return request.param, calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("left", "lengths"), [(False, [7, 1, 12, 3]), (True, [7, 1, 12, 3]),
                                               (False, [WRITTEN_OUT_MAX + 6, 40])])  # fused
def test_each_real_token_equals_its_sentence_run_alone(attn: str, left: bool,
                                                       lengths: list[int],
                                                       attention_path: tuple[str, list[int]],
                                                       ) -> None:
    model = _bert(attn)
    fast = unpadded(model)
    batch = _batch(lengths, left=left)
    with torch.no_grad():
        out = fast(**batch)
        padded = model(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    # BERT numbers positions from the left edge, padding included: a left-padded sentence is
    # not the sentence alone, in the padded model either
    for row, expected in enumerate([] if left else alone(model, batch)):
        torch.testing.assert_close(out.last_hidden_state[row][keep[row]], expected,
                                   rtol=1e-5, atol=1e-5)
    # padded positions are zero; the real ones are the padded model's too
    assert bool((out.last_hidden_state[~keep] == 0).all())
    torch.testing.assert_close(out.last_hidden_state[keep], padded[keep], rtol=1e-5, atol=1e-5)
    if not left:  # the pooler reads position 0, a real token on the right-padded batch
        torch.testing.assert_close(out.pooler_output, model(**batch).pooler_output,
                                   rtol=1e-5, atol=1e-5)
    assert calls(fast) == 1
    assert "forward" not in vars(model)  # the input model is untouched
    path, kernel_calls = attention_path  # the kernel ran once a layer, or (switched off) never
    assert len(kernel_calls) == (2 if path == "varlen kernel" else 0)


@pytest.mark.skipif(bool(varlen.library_problem()), reason=varlen.library_problem())
def test_long_rows_with_little_padding_take_the_padded_attention(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64,
                                 max_position_embeddings=320)).eval()
    fast = unpadded(model)
    calls: list[int] = []
    run = varlen.varlen_attention
    monkeypatch.setattr(varlen, "varlen_attention", lambda *a: calls.append(1) or run(*a))
    for lengths, kernel in (([300, 296], False), ([300, 5, 17], True)):
        calls.clear()
        torch.testing.assert_close(*real_tokens(fast, model, _batch(lengths)), rtol=1e-5,
                                   atol=1e-5)
        assert len(calls) == (2 if kernel else 0), lengths


def test_a_head_model_and_positional_arguments() -> None:
    """RoBERTa (positions counted from its padding token) under a classification head."""
    model = _roberta()
    fast = unpadded(model)
    batch = _batch([5, 9, 2], pad=1)
    del batch["token_type_ids"]
    with torch.no_grad():
        logits = fast(**batch).logits
        rows = [model(input_ids=batch["input_ids"][r:r + 1, :n]).logits
                for r, n in enumerate([5, 9, 2])]
        again = fast.roberta(batch["input_ids"], batch["attention_mask"])  # positional
    torch.testing.assert_close(logits, torch.cat(rows), rtol=1e-5, atol=1e-5)
    assert calls(fast) == 2 and again.last_hidden_state.shape == (3, 9, 32)


def test_written_out_and_fused_attention_are_one_function() -> None:
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    textbook = torch.zeros_like(q)  # softmax(q·kᵀ·s) v over each row's real keys
    for row, n in enumerate([3, 5]):
        scores = q[row] @ k[row, :, :n].transpose(1, 2) * 0.5
        textbook[row] = torch.softmax(scores, dim=-1) @ v[row, :, :n]
    for eager in (True, False):
        torch.testing.assert_close(attention(q, k, v, keep, 0.5, eager), textbook)


def test_pack_and_scatter_are_inverse() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    index = pack_index(mask)
    assert index.tolist() == [0, 1, 4, 5]
    tokens = torch.arange(8.0).view(4, 2)
    full = scatter(tokens, index, 6)
    assert full.tolist() == [[0, 1], [2, 3], [0, 0], [0, 0], [4, 5], [6, 7]]
    assert torch.equal(full.index_select(0, index), tokens)


def test_other_calls_run_the_models_forward() -> None:
    model = _bert()
    fast = unpadded(model)
    batch = _batch([4, 6])
    full = {k: v[1:] for k, v in batch.items()}  # no padding: nothing to remove
    with torch.no_grad():
        assert torch.equal(fast(**full).last_hidden_state, model(**full).last_hidden_state)
        assert torch.equal(fast(input_ids=batch["input_ids"]).last_hidden_state,
                           model(input_ids=batch["input_ids"]).last_hidden_state)
        states = fast(**batch, output_hidden_states=True).hidden_states
        assert states is not None and len(states) == 3
        embeds = model.embeddings.word_embeddings(batch["input_ids"])
        fast(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    assert calls(fast) == 0
    fast.train()
    fast(**batch).last_hidden_state.sum().backward()  # training runs the model's forward
    assert calls(fast) == 0
    assert fast.encoder.layer[0].output.dense.weight.grad is not None


def test_quantized_layers_run_packed() -> None:
    """Per-token int8 activations see the same tokens packed or padded."""
    model = _bert()
    batch = _batch([3, 11, 8, 6])
    calibration = [_batch([9, 4, 12]), _batch([5, 7])]
    for method in ({"method": "int8_dynamic"},
                   {"method": "smoothquant", "activations": "static"}):
        padded = sl.compress(model, {"steps": [method]}, calibration=calibration).model
        fast = unpadded(model, method, calibration=calibration)
        keep = batch["attention_mask"].bool()
        with torch.no_grad():
            want = padded(**batch).last_hidden_state[keep]
            got = fast(**batch).last_hidden_state[keep]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert calls(fast) == 1


def test_compiled_over_batches_of_other_shapes() -> None:
    model = _bert()
    compiled = sl.compress(model, {"steps": [{"method": "unpad"}, {"method": "compile"}]}).model
    keep_calls = 0
    for lengths in ([7, 1, 12], [3, 5], [9, 9, 2, 4]):
        torch.testing.assert_close(*real_tokens(compiled, model, _batch(lengths)), rtol=1e-4,
                                   atol=1e-4)
        keep_calls += 1
    assert calls(compiled) == keep_calls


def test_survives_save_load_and_deepcopy(tmp_path) -> None:
    model = _bert()
    fast = unpadded(model)
    twin = copy.deepcopy(fast)
    assert vars(twin)["forward"].model is twin
    sl.save(fast, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=_bert())
    batch = _batch([2, 8])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, fast(**batch).last_hidden_state)
    assert calls(loaded) == 1 and calls(twin) == 0


def test_transformers_from_pretrained_runs_it_again(tmp_path) -> None:
    """The way sentence-transformers opens a saved directory: transformers' loader, which
    applies the runtime steps of a checkpoint marked as slimline's (one whose weights only
    slimline reads: here int8; a recipe of runtime steps alone saves a plain checkpoint, see
    export/hf_config.py)."""
    from transformers import AutoModel

    fast = unpadded(_bert(), {"method": "int8_dynamic"})
    sl.save(fast, tmp_path / "ck")
    loaded = AutoModel.from_pretrained(tmp_path / "ck").eval()
    batch = _batch([3, 10, 6])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, fast(**batch).last_hidden_state)
    assert calls(loaded) == 1


def test_export_writes_the_padded_graph(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    fast = unpadded(_bert())
    report = sl.export(fast, tmp_path / "onnx", format="onnx", example=_batch([4, 9]))
    assert report.parity and all(check.passed and check.max_abs_diff <= 1e-4
                                 for check in report.parity)
    assert calls(fast) == 0 and vars(fast)["forward"].enabled  # switched back on after


def test_refused_before_anything_changes(tiny_gpt2: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"unpad\): GPT2LMHeadModel has no BERT-like encoder"):
        unpadded(tiny_gpt2)
    assert "forward" not in vars(tiny_gpt2)
    skipped = sl.compress(tiny_gpt2, {"steps": [{"method": "unpad", "if_unsupported": "skip"}]})
    assert "forward" not in vars(skipped.model)
    assert "left padded: GPT2LMHeadModel has no BERT-like encoder" in str(skipped.steps)
    with pytest.raises(ValueError, match="unpad.targets"):
        sl.Recipe.from_dict({"steps": [{"method": "unpad", "targets": {"include": ["*"]}}]})
    with pytest.raises(ValueError, match=r"\(unpad\) must come before step 0 \(compile\)"):
        sl.Recipe.from_dict({"steps": [{"method": "compile"}, {"method": "unpad"}]})
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match="compile.backend: onnxruntime runs one exported graph"):
        sl.compress(_bert(), {"steps": [{"method": "unpad"},
                                        {"method": "compile", "backend": "onnxruntime"}]})
