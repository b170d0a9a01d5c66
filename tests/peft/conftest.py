"""Tiny GPT-2 (Conv1D layers) and BERT classifier, beside the shared tiny Llama."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def tiny_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=3,
                        max_position_embeddings=64)  # fmt: skip
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def labelled_batches() -> list[dict[str, torch.Tensor]]:
    """Sequence-classification batches: ``labels`` (B,) in [0, 3), right padding."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(3):
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 9:] = 0
        out.append({"input_ids": torch.randint(0, 128, (2, 12), generator=g),
                    "attention_mask": mask,
                    "labels": torch.randint(0, 3, (2,), generator=g)})  # fmt: skip
    return out
