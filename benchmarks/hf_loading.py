"""Every method's output opened the way users open models: transformers ``from_pretrained``.

For each method and each of three local Hugging Face directories — a Llama, a GPT-2 (its
``Conv1D`` layers) and a BERT, small and randomly initialised (``save_pretrained`` of a seeded
model) — the model is compressed with calibration batches of varied lengths (padded), saved
with ``sl.save`` and opened twice: ``sl.load(out)`` and ``AutoModel*.from_pretrained(out)``
after ``import slimline``. The table gives the largest absolute difference of their outputs
(logits; BERT's last hidden state) on a padded batch — expected exactly 0 — and the first line
of the error a Python *without* slimline on its path gets from ``from_pretrained(out)``.

Usage: ``python -m benchmarks.hf_loading`` (writes the ``hf-loading`` section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

# (row label, recipe steps); a step that does not apply to an architecture is reported as
# the error compress gives.
RECIPES: list[tuple[str, list[dict[str, Any]]]] = [
    ("rtn int4 g32", [{"method": "rtn", "bits": 4, "group_size": 32}]),
    ("gptq int4 g32", [{"method": "gptq", "bits": 4, "group_size": 32}]),
    ("awq int4 g32", [{"method": "awq", "bits": 4, "group_size": 32}]),
    ("hqq int4 g32", [{"method": "hqq", "bits": 4, "group_size": 32}]),
    ("fp8", [{"method": "fp8"}]),
    ("int8_dynamic", [{"method": "int8_dynamic"}]),
    ("smoothquant static", [{"method": "smoothquant", "activations": "static"}]),
    ("smoothquant dynamic", [{"method": "smoothquant", "activations": "dynamic"}]),
    ("magnitude 50% (sparse)", [{"method": "magnitude", "sparsity": 0.5}]),
    ("structured 25% (heads + neurons)", [{"method": "structured", "sparsity": 0.25}]),
    ("structured 25% (neurons)",
     [{"method": "structured", "sparsity": 0.25, "units": ["neurons"]}]),
    ("layer_drop 1", [{"method": "layer_drop", "n_layers": 1}]),
    ("kv_cache int4", [{"method": "kv_cache", "bits": 4}]),
    ("wanda 50% → gptq int4 → kv_cache (BERT: no kv_cache)", [
        {"method": "wanda", "sparsity": 0.5},
        {"method": "gptq", "bits": 4, "group_size": 32},
        {"method": "kv_cache", "bits": 4},
    ]),
]
COMBINED = RECIPES[-1][0]


def steps_for(label: str, arch: str) -> list[dict[str, Any]]:
    """The row's steps for ``arch``: an encoder has no KV cache, so the combined recipe
    leaves that step out on BERT."""
    steps = dict(RECIPES)[label]
    if label == COMBINED and arch == "bert":
        return [s for s in steps if s["method"] != "kv_cache"]
    return steps
ARCHITECTURES = ("llama", "gpt2", "bert")
VOCAB = 128


def build_model(arch: str) -> torch.nn.Module:
    """A small seeded model of ``arch`` (random weights: only equality is measured)."""
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    if arch == "bert":
        return BertModel(BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)).eval()
    raise ValueError(f"unknown architecture {arch!r}")


def auto_class(arch: str) -> Any:
    """The class a user opens ``arch``'s directory with."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if arch == "bert" else AutoModelForCausalLM


def padded_batches(n: int = 4, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 3 rows of 5–24 real tokens, right-padded to the longest row."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        lengths = torch.randint(5, 25, (3,), generator=g).tolist()
        width = max(lengths)
        ids = torch.zeros(3, width, dtype=torch.long)
        mask = torch.zeros(3, width, dtype=torch.long)
        for row, length in enumerate(lengths):
            ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=g)
            mask[row, :length] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits, or the last hidden state of an encoder."""
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def compressed_dir(arch: str, steps: list[dict[str, Any]], root: Path) -> Path:
    """Compress ``arch``'s model with ``steps`` and ``sl.save`` it under ``root``."""
    import slimline as sl

    result = sl.compress(build_model(arch), {"steps": steps}, calibration=padded_batches())
    return sl.save(result.model, root / f"{arch}-{abs(hash(str(steps)))}")


def max_abs_diff(arch: str, out: Path) -> float:
    """``from_pretrained`` versus ``sl.load``: largest absolute output difference."""
    import slimline as sl

    reference = sl.load(out)
    loaded = auto_class(arch).from_pretrained(out)
    batch = padded_batches(1, seed=7)[0]
    return float((outputs(loaded, batch) - outputs(reference, batch)).abs().max())


def error_without_slimline(arch: str, out: Path) -> str:
    """What ``from_pretrained(out)`` says in a Python where slimline cannot be imported."""
    from tests.export.without_slimline import LOAD_CODE, run_without_slimline

    report = run_without_slimline(LOAD_CODE, str(out), auto_class(arch).__name__)
    if report["loaded"]:
        return "LOADED (no error)"
    return f"{report['error']}: {report['message'].splitlines()[0]}"


def main() -> None:
    from benchmarks.harness import conditions_line, markdown_table, print_table, write_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    header = ["method", *(f"{a}: max abs diff" for a in ARCHITECTURES)]
    rows, errors = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, _ in RECIPES:
            row: list[Any] = [label]
            for arch in ARCHITECTURES:
                try:
                    out = compressed_dir(arch, steps_for(label, arch), Path(tmp))
                except (ValueError, TypeError) as exc:
                    row.append(f"refused: {str(exc).splitlines()[0][:90]}")
                    continue
                row.append(f"{max_abs_diff(arch, out):.1e}".replace("0.0e+00", "0"))
                errors.setdefault(arch, error_without_slimline(arch, out))
            rows.append(row)
            print(row, flush=True)
    table = markdown_table(header, rows)
    error_lines = "\n".join(f"- {arch}: `{text}`" for arch, text in errors.items())
    body = (f"{conditions_line(torch.get_num_threads())}\n\n{__doc__.split(chr(10) + chr(10))[1]}"
            f"\n\n{table}\n\nWithout slimline on the path (first compressed directory of each "
            f"architecture; every marked directory carries the same guard):\n\n{error_lines}\n")
    print_table("from_pretrained vs sl.load", header, rows)
    print(error_lines)
    if not args.no_write:
        write_section("hf-loading", "Compressed models through transformers from_pretrained",
                      body)


if __name__ == "__main__":
    main()
