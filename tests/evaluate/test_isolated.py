"""Peak memory of each model in a process of its own, against the bytes it must hold."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from slimline.core.checkpoint import register_architecture
from slimline.evaluate import evaluate, isolated
from slimline.models.digits_cnn import DigitsCNN

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
MIB = 1 << 20


@linux_only
def test_each_model_is_measured_alone() -> None:
    """A model holding 64 MiB of weights peaks at least 64 MiB above a 0.3 MB one.

    In one shared process the small model's figure would include the big one's weights (both
    are resident), and the two peaks would be about equal.
    """
    small = DigitsCNN().eval()
    big = DigitsCNN(hidden=32768).eval()  # fc1: 512 x 32768 float32 = 64 MiB exactly
    assert big.fc1.weight.numel() * 4 == 64 * MIB
    report = evaluate(big, [torch.randn(4, 1, 8, 8)], metrics=["memory"], baseline=small)
    conditions, models = report["conditions"], report["models"]
    assert conditions["peak_memory_method"] == "own process"
    assert "own" in conditions["methods"]["memory"] and not conditions["notes"]
    assert models["model"]["peak_memory_bytes"] - models["baseline"]["peak_memory_bytes"] \
        >= 64 * MIB
    assert models["baseline"]["peak_memory_bytes"] < 64 * MIB
    for figures in models.values():
        assert figures["peak_memory_bytes_process"] > figures["peak_memory_bytes"] > 0


@register_architecture
class HungryNet(nn.Module):
    """A registered user architecture whose forward writes every page of a 200 MB temporary."""

    def __init__(self, temporary: int = 50_000_000) -> None:
        super().__init__()
        self.temporary = temporary
        self.linear = nn.Linear(3, 3)

    def slimline_init_kwargs(self) -> dict[str, object]:
        return {"temporary": self.temporary}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.ones(self.temporary)  # float32: 4 bytes a value
        return self.linear(x) + scratch[:1]


@linux_only
def test_child_sees_the_forward_working_memory_of_a_registered_user_model() -> None:
    report = evaluate(HungryNet(), [torch.randn(2, 3)], metrics=["memory"])
    assert report["conditions"]["peak_memory_method"] == "own process"
    assert report["models"]["model"]["peak_memory_bytes"] >= 50_000_000 * 4 * 0.95


def test_unrebuildable_model_is_measured_in_process_and_the_report_says_why() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    report = evaluate(model, [torch.randn(2, 4)], metrics=["memory"])
    conditions = report["conditions"]
    assert conditions["peak_memory_method"] == "shared process"
    assert any("cannot rebuild" in note for note in conditions["notes"])
    assert "every model held" in conditions["methods"]["memory"]
    assert report["models"]["model"]["peak_memory_bytes"] > 0


def test_a_failed_child_names_its_error(tmp_path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", "raise SystemExit('out of coffee')"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    child = isolated.Child(process, tmp_path / "none.json", "model")
    with pytest.raises(isolated.NotIsolated, match="'model'.*out of coffee"):
        child.result()


@pytest.mark.parametrize(
    "batch",
    [
        torch.arange(6.0).view(2, 3),
        {"input_ids": torch.arange(8).view(2, 4), "attention_mask": torch.ones(2, 4)},
        (torch.zeros(2, 1), torch.arange(4).view(2, 2)[:, 1]),  # a non-contiguous view
    ],
)
def test_batch_file_round_trip(tmp_path, batch) -> None:
    isolated.write_batch(batch, tmp_path / "b.safetensors")
    back = isolated.read_batch(tmp_path / "b.safetensors")
    assert type(back) is type(batch)
    if isinstance(batch, torch.Tensor):
        assert torch.equal(back, batch)
    elif isinstance(batch, dict):
        assert set(back) == set(batch)  # keyword arguments: order does not matter
        assert all(torch.equal(back[k], batch[k]) for k in batch)
    else:
        assert all(torch.equal(a, b) for a, b in zip(back, batch, strict=True))
