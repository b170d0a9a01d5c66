"""``digits-cnn``: a small CNN trained here on scikit-learn's bundled 8x8 ``digits`` images.

No network: ``sklearn.datasets.load_digits`` ships with scikit-learn. The 1,797 images are
split once, stratified and seeded, into train / validation / test (70 / 10 / 20).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimline.core.batches import Batch
from slimline.core.checkpoint import register_architecture
from slimline.models.builtin import Builtin, slice_batches
from slimline.models.cache import cached_dir
from slimline.models.cpu import num_threads
from slimline.models.stdlib_files import SPLITS, Split

NAME = "digits-cnn"
VERSION = "v1"
_SEED = 0
_EPOCHS = 20  # x 20 batches of 64: a few seconds on two cores, ~98% test accuracy
_BATCH = 64
_LR = 5e-3


@register_architecture  # so sl.load can rebuild it from slimline_init_kwargs(), without pickle
class DigitsCNN(nn.Module):
    """conv 3x3 (1->c1) -> ReLU -> conv 3x3 (c1->c2) -> ReLU -> maxpool 2 -> MLP -> 10 logits.

    The hidden linear layer gives compressors a Linear that is not the output head.
    """

    def __init__(
        self,
        channels: tuple[int, int] | list[int] = (16, 32),
        hidden: int = 128,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if len(channels) != 2 or min(channels) <= 0 or hidden <= 0 or num_classes <= 1:
            raise ValueError(
                f"DigitsCNN: need two positive channels, hidden > 0 and num_classes > 1, got "
                f"channels={channels}, hidden={hidden}, num_classes={num_classes}"
            )
        c1, c2 = int(channels[0]), int(channels[1])
        self._init = (c1, c2, int(hidden), int(num_classes))
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images (B, 1, 8, 8) with values in [0, 1]."""
        x = torch.relu(self.conv1(pixel_values))  # (B, c1, 8, 8)
        x = self.pool(torch.relu(self.conv2(x)))  # (B, c2, 4, 4)
        x = torch.relu(self.fc1(x.flatten(1)))  # (B, hidden)
        return self.head(x)

    def slimline_init_kwargs(self) -> dict[str, object]:
        """JSON-able constructor kwargs: ``DigitsCNN(**m.slimline_init_kwargs())`` rebuilds it.

        Read from the live layers where they say, so a model whose channels or neurons were
        pruned away (structured pruning) rebuilds with its new widths.
        """
        c1, c2, hidden, classes = self._init
        return {
            "channels": [
                int(getattr(self.conv1, "out_channels", c1)),
                int(getattr(self.conv2, "out_channels", c2)),
            ],
            "hidden": int(getattr(self.head, "in_features", hidden)),
            "num_classes": int(getattr(self.head, "out_features", classes)),
        }


def digits_split_indices(labels: Sequence[int]) -> dict[Split, list[int]]:
    """Row indices per split: stratified by label, seeded, sorted (70 / 10 / 20)."""
    from sklearn.model_selection import train_test_split

    index = list(range(len(labels)))
    rest, test = train_test_split(index, test_size=0.2, random_state=_SEED, stratify=labels)
    train, validation = train_test_split(
        rest, test_size=0.125, random_state=_SEED, stratify=[labels[i] for i in rest]
    )
    return {"train": sorted(train), "validation": sorted(validation), "test": sorted(test)}


def digits_splits() -> dict[Split, dict[str, torch.Tensor]]:
    """The fixed split: ``pixel_values`` (N, 1, 8, 8) float32 in [0, 1], ``labels`` (N,) int64."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    pixels = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    targets = torch.tensor(labels, dtype=torch.int64)
    return {
        split: {"pixel_values": pixels[idx], "labels": targets[idx]}
        for split, idx in digits_split_indices(labels.tolist()).items()
    }


def train_digits_cnn(data: dict[str, torch.Tensor]) -> DigitsCNN:
    """Train a fresh :class:`DigitsCNN` deterministically (seeded init and order, one thread)."""
    with torch.random.fork_rng(devices=[]), num_threads(1):
        torch.manual_seed(_SEED)
        model = DigitsCNN()
        optimizer = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=1e-4)
        generator = torch.Generator().manual_seed(_SEED)
        n = data["labels"].shape[0]
        model.train()
        for _ in range(_EPOCHS):
            for idx in torch.randperm(n, generator=generator).split(_BATCH):
                loss = nn.functional.cross_entropy(
                    model(data["pixel_values"][idx]), data["labels"][idx]
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> float:
    """Top-1 accuracy of ``model`` on one split."""
    predictions = model(data["pixel_values"]).argmax(dim=-1)
    return float((predictions == data["labels"]).float().mean())


def _build(out: Path) -> None:
    start = time.perf_counter()
    splits = digits_splits()
    model = train_digits_cnn(splits["train"])
    save_file(model.state_dict(), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(model.slimline_init_kwargs()), encoding="utf-8")
    flat = {f"{split}.{key}": t for split, part in splits.items() for key, t in part.items()}
    save_file(flat, str(out / "data.safetensors"))
    report = {
        "name": NAME,
        "version": VERSION,
        "accuracy": {split: accuracy(model, splits[split]) for split in SPLITS},
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


def load_digits_cnn() -> Builtin:
    """Load (training into the cache on first use, a few seconds) the digits CNN and its data."""
    directory = cached_dir(f"{NAME}-{VERSION}", _build)
    kwargs = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    with torch.random.fork_rng(devices=[]):
        model = DigitsCNN(**kwargs)
    model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    model.eval()
    flat = load_file(str(directory / "data.safetensors"))

    def make_batches(split: Split, batch_size: int, limit: int | None) -> list[Batch]:
        part = {key: flat[f"{split}.{key}"] for key in ("pixel_values", "labels")}
        return slice_batches(part, batch_size, limit)

    return Builtin(NAME, model, None, "classification", make_batches)


def digits_report() -> dict[str, object]:
    """The cached build report: accuracy per split and build time."""
    directory = cached_dir(f"{NAME}-{VERSION}", _build)
    report: dict[str, object] = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
    return report
