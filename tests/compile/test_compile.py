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
