from __future__ import annotations

import pytest
import torch

from slimline.models import BUILTIN_MODELS, Builtin, is_builtin, load_builtin


def test_names() -> None:
    assert BUILTIN_MODELS == ("code-llama-tiny", "minilm", "digits-cnn", "llama-1b-random")
    assert all(is_builtin(n) for n in BUILTIN_MODELS)
    assert not is_builtin("gpt2")
    assert not is_builtin("Code-Llama-Tiny")


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="gpt-7") as err:
        load_builtin("gpt-7")
    for name in BUILTIN_MODELS:
        assert name in str(err.value)


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="size"):
        load_builtin("digits-cnn", size="medium")  # type: ignore[arg-type]


def test_batches_argument_checks(digits: Builtin) -> None:
    with pytest.raises(ValueError, match="split"):
        digits.batches("dev", batch_size=4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        digits.batches("test", batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        digits.batches("test", batch_size=4, limit=-1)
    with pytest.raises(TypeError, match="limit"):
        digits.batches("test", batch_size=4, limit=2.5)  # type: ignore[arg-type]


def test_limit_counts_batches(digits: Builtin) -> None:
    batches = digits.batches("test", batch_size=4, limit=3)
    assert [b["labels"].shape[0] for b in batches] == [4, 4, 4]  # type: ignore[index]
    assert digits.batches("test", batch_size=4, limit=0) == []
    whole = digits.batches("test", batch_size=100)
    assert [b["labels"].shape[0] for b in whole] == [100, 100, 100, 60]  # type: ignore[index]
    assert len(digits.batches("test", batch_size=100, limit=99)) == 4


def test_batches_are_fresh_copies(digits: Builtin) -> None:
    first = digits.batches("test", batch_size=8, limit=8)[0]
    first["pixel_values"].zero_()  # type: ignore[index]
    again = digits.batches("test", batch_size=8, limit=8)[0]
    assert again["pixel_values"].abs().sum() > 0  # type: ignore[index]


def test_loading_leaves_global_rng_alone(models_cache: object, digits: Builtin) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_builtin("digits-cnn")
    assert torch.equal(torch.rand(3), expected)
