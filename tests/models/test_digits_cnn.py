from __future__ import annotations

import json
from pathlib import Path

import torch

from slimline.core.batches import forward, split_labels
from slimline.models import Builtin, DigitsCNN
from slimline.models.digits_cnn import digits_split_indices
from slimline.models.stdlib_files import SPLITS


def _accuracy(builtin: Builtin, split: str) -> float:
    correct = total = 0
    with torch.no_grad():
        for batch in builtin.batches(split, batch_size=128):  # type: ignore[arg-type]
            _, labels = split_labels(batch)
            assert labels is not None
            correct += int((forward(builtin.model, batch).argmax(-1) == labels).sum())
            total += labels.numel()
    return correct / total


def test_accuracy(digits: Builtin) -> None:
    assert digits.task == "classification"
    assert digits.tokenizer is None
    assert not digits.model.training
    assert _accuracy(digits, "test") > 0.9
    assert _accuracy(digits, "validation") > 0.9


def test_batches_shapes(digits: Builtin) -> None:
    batches = digits.batches("train", batch_size=32, limit=2)
    assert [b["pixel_values"].shape for b in batches] == [(32, 1, 8, 8), (32, 1, 8, 8)]  # type: ignore[index]
    for b in batches:
        assert b["pixel_values"].dtype == torch.float32  # type: ignore[index]
        assert b["labels"].dtype == torch.int64  # type: ignore[index]
        assert 0.0 <= float(b["pixel_values"].min()) <= float(b["pixel_values"].max()) <= 1.0  # type: ignore[index]
    assert forward(digits.model, batches[0]).shape == (32, 10)


def test_splits_partition_the_dataset(digits: Builtin) -> None:
    from sklearn.datasets import load_digits

    labels = load_digits().target.tolist()
    parts = digits_split_indices(labels)
    sets = [set(parts[s]) for s in SPLITS]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2])
    assert sets[1].isdisjoint(sets[2])
    assert set().union(*sets) == set(range(len(labels)))
    assert [len(parts[s]) for s in SPLITS] == [1257, 180, 360]
    sizes = [sum(b["labels"].shape[0] for b in digits.batches(s, batch_size=512)) for s in SPLITS]  # type: ignore[index]
    assert sizes == [1257, 180, 360]


def test_rebuild_from_init_kwargs(digits: Builtin) -> None:
    model = digits.model
    assert isinstance(model, DigitsCNN)
    kwargs = json.loads(json.dumps(model.slimline_init_kwargs()))
    clone = DigitsCNN(**kwargs)
    clone.load_state_dict(model.state_dict())
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_init_kwargs_follow_pruned_widths() -> None:
    model = DigitsCNN(channels=(8, 12), hidden=20)
    assert model.slimline_init_kwargs() == {"channels": [8, 12], "hidden": 20, "num_classes": 10}
    model.fc1 = torch.nn.Linear(12 * 16, 7)
    model.head = torch.nn.Linear(7, 10)
    assert model.slimline_init_kwargs()["hidden"] == 7


def test_checkpoint_round_trip_without_pickle(digits: Builtin, tmp_path: Path) -> None:
    import slimline

    slimline.save(digits.model, tmp_path / "ckpt")
    loaded = slimline.load(tmp_path / "ckpt")
    assert isinstance(loaded, DigitsCNN)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), digits.model(x))
