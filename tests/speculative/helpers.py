"""Tiny models, drafts and a compress shortcut for the speculative tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimline as sl


def small_like(model: nn.Module, seed: int = 1) -> nn.Module:
    """A smaller random model of ``model``'s family with the same vocabulary: a draft."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    config = model.config  # type: ignore[union-attr]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config.model_type == "gpt2":
            return GPT2LMHeadModel(GPT2Config(
                vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=16,
                n_layer=1, n_head=2, bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id)).eval()
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=config.max_position_embeddings,
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)).eval()


def saved(model: nn.Module, where: Path) -> str:
    sl.save(model, where)
    return str(where)


def speculative(model: nn.Module, calibration: Any = None, **fields: Any) -> nn.Module:
    recipe = {"steps": [{"method": "speculative", **fields}]}
    return sl.compress(model, recipe, calibration=calibration).model


def greedy(model: nn.Module, ids: torch.Tensor, new: int = 12, **kwargs: Any) -> torch.Tensor:
    out: torch.Tensor = model.generate(  # type: ignore[operator]
        ids, max_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
    return out


def prompts(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Prompts of 1, 6 and 21 tokens; the last repeats a 7-token phrase three times, so that
    prompt lookup has something to copy."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, vocab, (7,), generator=g)
    return [torch.randint(3, vocab, (1, n), generator=g) for n in (1, 6)] + [
        phrase.repeat(3).view(1, -1)]
