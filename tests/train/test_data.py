"""``group_by_length``: the same samples, re-batched by length, each padded only to its batch's
longest; a padding-invariant encoder gives every sample the same embedding as before."""

from __future__ import annotations

import pytest
import torch

import slimline as sl
from slimline.core.batches import mean_pool
from slimline.train.data import group_by_length

PAD = 7


def _batches(lengths: list[list[int]], *, left: bool = False, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Text batches, each padded to its longest row with token ``PAD`` and labels -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in lengths:
        width = max(rows)
        ids = torch.full((len(rows), width), PAD)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, n in enumerate(rows):
            span = slice(width - n, width) if left else slice(0, n)
            ids[i, span] = torch.randint(10, 96, (n,), generator=g)
            mask[i, span] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                    "score": torch.rand(len(rows), generator=g)})
    return out


def _samples(batches) -> list[tuple]:
    """Every sample as (real tokens, real labels, score), in any order."""
    found = []
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            real = b["attention_mask"][i] == 1
            found.append((tuple(b["input_ids"][i][real].tolist()), tuple(b["labels"][i][real].tolist()),
                          float(b["score"][i])))
    return sorted(found)


@pytest.mark.parametrize("left", [False, True])
def test_same_samples_less_padding_padded_as_before(left: bool) -> None:
    source = _batches([[3, 12, 5], [11, 2, 4], [6, 12, 1]], left=left)
    grouped = group_by_length(source, 4)
    assert [b["input_ids"].shape for b in grouped] == [(4, 4), (4, 12), (1, 12)]  # 1-4, 5-12, 12
    assert _samples(grouped) == _samples(source)
    for b in grouped:  # padding on the source's side, with the source's fill values
        mask = b["attention_mask"]
        assert (mask.sum(1) == mask.shape[1]).any()  # each batch as wide as its longest row
        edge = mask[:, -1] if left else mask[:, 0]  # every row starts (ends) real
        assert bool(edge.all())
        assert bool((b["input_ids"][mask == 0] == PAD).all())
        assert bool((b["labels"][mask == 0] == -100).all())
    real = sum(int(b["attention_mask"].sum()) for b in source)
    assert real == sum(int(b["attention_mask"].sum()) for b in grouped)
    assert sum(b["attention_mask"].numel() for b in grouped) < sum(b["attention_mask"].numel() for b in source)


def test_an_encoder_embeds_every_sample_as_before() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32)).eval()
    source = _batches([[3, 12, 5, 9], [11, 2, 4, 12]])

    def embeddings(batches) -> dict[tuple, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for b in batches:
                pooled = mean_pool(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                   .last_hidden_state, b["attention_mask"])
                for i in range(pooled.shape[0]):
                    out[tuple(b["input_ids"][i][b["attention_mask"][i] == 1].tolist())] = pooled[i]
        return out

    before, after = embeddings(source), embeddings(group_by_length(source, 3))
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-5)


def test_batches_it_cannot_regroup_are_named() -> None:
    with pytest.raises(ValueError, match="distill.group_by_length: needs dict batches"):
        group_by_length([torch.zeros(2, 3)], 2, field="distill.group_by_length")
    gappy = _batches([[4, 4]])
    gappy[0]["attention_mask"][0, 1] = 0
    with pytest.raises(ValueError, match="not contiguous"):
        group_by_length(gappy, 2)
    odd = _batches([[4, 4]])
    odd[0]["extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match="'extra' is not a tensor with one row per sample"):
        group_by_length(odd, 2)


def test_distill_trains_on_grouped_batches_and_says_so_when_it_cannot() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32,
                                 initializer_range=0.2)).eval()
    train = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")}
             for b in _batches([[3, 12, 5, 9], [11, 2, 4, 12], [6, 7, 12, 2]], seed=1)]
    prune = {"method": "structured", "sparsity": 0.5}
    distill = {"method": "distill", "steps": 6, "lr": 1e-3, "group_by_length": True}
    pruned = sl.compress(model, {"steps": [prune]}, calibration=train).model
    result = sl.compress(model, {"steps": [prune, distill]}, calibration=train)
    changed = [n for n, p in result.model.named_parameters()
               if not torch.equal(p, pruned.get_parameter(n))]
    assert changed and "embeddings.word_embeddings.weight" in changed
    with pytest.raises(ValueError, match="distill.group_by_length"):
        sl.compress(model, {"steps": [prune, distill]}, calibration=train,
                    training=[torch.randint(0, 96, (4, 6)) for _ in range(2)])
