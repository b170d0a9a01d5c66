from __future__ import annotations

import pytest
import torch

import slimline as sl
from tests.conftest import TinyMLP


def test_compile_same_output_and_saves(tmp_path, tiny_mlp) -> None:
    model = sl.compress(tiny_mlp, {"steps": [{"method": "compile"}]}).model
    assert type(model) is type(tiny_mlp)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_mlp(x), rtol=1e-5, atol=1e-5)
    sl.save(model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=TinyMLP())
    assert loaded._compiled_call_impl is not None  # compiled again on load
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tiny_mlp(x), rtol=1e-5, atol=1e-5)


def test_compile_rejects_targets() -> None:
    with pytest.raises(ValueError, match="compile.targets"):
        sl.Recipe.from_dict({"steps": [{"method": "compile", "targets": {"include": ["fc1"]}}]})


def test_freezing_gives_the_eager_output_and_is_refused_where_it_cannot_apply(tiny_mlp) -> None:
    model = sl.compress(tiny_mlp, {"steps": [{"method": "compile", "freezing": True}]}).model
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_mlp(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compile.freezing.*not both"):
        sl.Recipe.from_dict({"steps": [{"method": "compile", "freezing": True,
                                        "mode": "max-autotune"}]})
    with pytest.raises(ValueError, match="compile.freezing.*only applies to backend inductor"):
        sl.Recipe.from_dict({"steps": [{"method": "compile", "freezing": True,
                                        "backend": "openvino"}]})


def _sdpa_calls(monkeypatch, run) -> int:
    """How many times ``run()`` calls torch's scaled_dot_product_attention."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
        run()
    return len(calls)


def test_eager_attention_gives_the_same_output_and_is_reapplied_on_load(tmp_path, monkeypatch
                                                                        ) -> None:  # fmt: skip
    from tests.export.test_onnx import _bert, _tokens

    bert = _bert()
    assert bert.config._attn_implementation == "sdpa"
    batch = _tokens(3, 12)  # the last row padded
    result = sl.compress(bert, {"steps": [{"method": "compile", "attention": "eager"}]})
    model = result.model
    assert "attention: eager" in result.steps[0].notes
    assert bert.config._attn_implementation == "sdpa"  # the input model is left as it was
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert _sdpa_calls(monkeypatch, lambda: bert(**batch)) == 2  # one a layer
        assert _sdpa_calls(monkeypatch, lambda: model.forward(**batch)) == 0  # uncompiled
        want = bert(**batch).last_hidden_state
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(model(**batch).last_hidden_state[real], want[real],
                                   rtol=1e-5, atol=1e-5)
    sl.save(model, tmp_path / "ck")
    loaded = sl.load(tmp_path / "ck", model=_bert())
    assert loaded.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state[real], want[real],
                                   rtol=1e-5, atol=1e-5)


def test_eager_attention_is_refused_for_a_model_without_an_attention_switch(tiny_mlp) -> None:
    before = {k: v.clone() for k, v in tiny_mlp.state_dict().items()}
    with pytest.raises(ValueError, match="compile.attention.*transformers model"):
        sl.compress(tiny_mlp, {"steps": [{"method": "int8_dynamic"},
                                         {"method": "compile", "attention": "eager"}]})
    assert all(torch.equal(v, before[k]) for k, v in tiny_mlp.state_dict().items())
