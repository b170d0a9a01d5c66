"""``torchrun --nproc-per-node 2 slimline compress ...``: the copies join one process group,
train together and rank 0 alone writes and prints; a user's Llama directory and text file of
varied lines, opened afterwards with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from slimline.train.launch import launched_size, process_group

LINES = ["the cat sat", "a dog ran far away from the old house", "hello",
         "one two three four five six seven eight nine ten eleven", "red blue",
         "we measured what it bought", "quiet", "a longer line of words to pad the others out"]  # fmt: skip


def _llama_dir(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for line in LINES for w in line.split()})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_without_torchrun_there_is_one_process(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_size() == 1
    with process_group() as rank:
        assert rank == 0
        assert not torch.distributed.is_initialized()


def test_torchrun_compress_trains_on_two_ranks_and_rank0_saves(tmp_path: Path) -> None:
    source, out = tmp_path / "llama", tmp_path / "out"
    _llama_dir(source)
    (tmp_path / "user.txt").write_text("\n".join(LINES) + "\n")
    (tmp_path / "recipe.yaml").write_text(
        "version: 1\nsteps:\n  - method: wanda\n    sparsity: 0.5\n"
        "  - method: distill\n    steps: 4\n    lr: 0.001\n    sharding: fsdp\n")
    slimline = Path(sys.executable).parent / "slimline"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--no-python", str(slimline), "compress", "--model", str(source), "--recipe",
         str(tmp_path / "recipe.yaml"), "--out", str(out), "--train-data", str(tmp_path / "user.txt"),
         "--calibration", str(tmp_path / "user.txt"), "--batch-size", "3"],
        capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved to") == 1  # rank 0 alone prints and writes
    report = json.loads((out / "compress.json").read_text())
    notes = [n for step in report["steps"] if step["method"] == "distill" for n in step["notes"]]
    assert any(n.startswith("2 processes, the model sharded over the ranks (FSDP2)") for n in notes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import slimline  # a pruned checkpoint stores sparse tensors: slimline reads them

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = AutoTokenizer.from_pretrained(out)(LINES[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
