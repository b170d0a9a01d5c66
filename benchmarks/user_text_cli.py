"""Every calibrated method through the command line, on a user's own model and text file.

What a new user does: a local Hugging Face directory (``save_pretrained``) and a text file of
their own — lines of different lengths, so every calibration batch is padded — at the CLI's
default settings (``--batch-size 8``, 8 calibration batches). Two directories: a Llama (the
trained ``code-llama-tiny@small``, saved with ``save_pretrained``) and a GPT-2 with random
weights sharing its tokenizer (no trained GPT-2 can be built offline; its perplexity only
shows the run finished with sane numbers). The text: 200 lines of English prose, 60–400
characters, joined from the standard library's docstring sentences (test split). The
calibration reads the file's first 64 lines; perplexity is measured on its last 40 lines.

Each row: the method, the command's exit code and wall seconds (process start to exit, on a
shared 2-core machine), and the held-out perplexity of the saved model.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness import conditions_line, markdown_table, print_table, write_section

LINES = 200
HELD_OUT = 40

RECIPES: list[tuple[str, dict[str, Any]]] = [
    ("wanda 50%", {"method": "wanda", "sparsity": 0.5}),
    ("sparsegpt 50%", {"method": "sparsegpt", "sparsity": 0.5}),
    ("swiftprune 50%", {"method": "swiftprune", "sparsity": 0.5}),
    ("gptq int4 g32", {"method": "gptq", "bits": 4, "group_size": 32}),
    ("awq int4 g32", {"method": "awq", "bits": 4, "group_size": 32}),
    ("smoothquant dynamic", {"method": "smoothquant"}),
    ("smoothquant static", {"method": "smoothquant", "activations": "static"}),
    ("rtn mixed 5 bits", {"method": "rtn", "average_bits": 5.0, "group_size": 32}),
    ("gptq mixed 5 bits", {"method": "gptq", "average_bits": 5.0, "group_size": 32}),
    ("hqq mixed 5 bits", {"method": "hqq", "average_bits": 5.0, "group_size": 32}),
    ("structured 25%", {"method": "structured", "sparsity": 0.25}),
    ("layer_drop 1", {"method": "layer_drop", "n_layers": 1}),
    ("qat int4 g32", {"method": "qat", "bits": 4, "group_size": 32}),
]


def prose_lines(n: int, seed: int = 0) -> list[str]:
    """``n`` lines of 60–400 characters of docstring prose, in a fixed shuffled order."""
    from slimline.models.docstrings import docstring_sentences
    from slimline.models.stdlib_files import stdlib_files

    sentences = docstring_sentences(stdlib_files())["test"]
    rng = random.Random(seed)
    rng.shuffle(sentences)
    lines, current = [], ""
    for s in sentences:
        target = rng.randint(60, 400)
        current = f"{current} {s}".strip()
        if len(current) >= target:
            lines.append(current[:400])
            current = ""
        if len(lines) == n:
            break
    return lines


def build_dirs(root: Path) -> dict[str, Path]:
    """A Llama and a GPT-2 Hugging Face directory (config, safetensors, tokenizer)."""
    import torch
    import transformers as tf

    from slimline.models import load_builtin

    built = load_builtin("code-llama-tiny", size="small")
    tok = built.tokenizer
    dirs = {"llama": root / "llama", "gpt2": root / "gpt2"}
    built.model.save_pretrained(dirs["llama"])
    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=len(tok), n_embd=128, n_layer=4, n_head=4, n_positions=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ))  # fmt: skip
    gpt2.save_pretrained(dirs["gpt2"])
    for d in dirs.values():
        tok.save_pretrained(d)
    return dirs


def held_out_perplexity(model_dir: Path, text: Path) -> float:
    from slimline.evaluate import evaluate
    from slimline.sources import resolve_model

    loaded = resolve_model(str(model_dir))
    data = loaded.data(str(text), split="test", batch_size=8, limit=None)
    report = evaluate(loaded.model, data, metrics=["perplexity"])
    return float(report["models"]["model"]["perplexity"])


def run_cli(args: list[str]) -> tuple[int, float, str]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slimline.cli", *args], capture_output=True,
                          text=True, check=False)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode, time.perf_counter() - start, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--only", help="comma-separated row labels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = build_dirs(root)
        lines = prose_lines(LINES)
        text, held = root / "my.txt", root / "held_out.txt"
        text.write_text("\n".join(lines) + "\n")
        held.write_text("\n".join(lines[-HELD_OUT:]) + "\n")
        lengths = sorted(len(s) for s in lines)
        rows = []
        for arch, model_dir in dirs.items():
            rows.append([arch, "(original)", "-", "-", f"{held_out_perplexity(model_dir, held):.2f}",
                         ""])
            for label, step in RECIPES:
                if args.only and label not in args.only.split(","):
                    continue
                recipe = root / "r.yaml"
                recipe.write_text(yaml.safe_dump({"steps": [step]}))
                out = root / f"out-{arch}"
                code, secs, last = run_cli(["compress", "--model", str(model_dir), "--recipe",
                                            str(recipe), "--calibration", str(text), "--out",
                                            str(out)])
                ppl = f"{held_out_perplexity(out, held):.2f}" if code == 0 else "-"
                rows.append([arch, label, code, f"{secs:.1f}", ppl, "" if code == 0 else last])
                print(rows[-1], flush=True)
    header = ["model dir", "method", "exit code", "seconds", "held-out perplexity", "message"]
    print_table("CLI on a user's model and text", header, rows)
    if args.no_write:
        return
    body = (
        f"{conditions_line(threads=2)}; text: {LINES} lines of {lengths[0]}–{lengths[-1]} "
        f"characters; `slimline compress --model DIR --recipe r.yaml --calibration my.txt "
        f"--out OUT` at defaults (batch size 8, 8 batches: padded, varied lengths); perplexity "
        f"on the file's last {HELD_OUT} lines. Llama: code-llama-tiny@small saved with "
        "save_pretrained; GPT-2: random weights (a run check, not a quality figure). "
        f"1-minute load average at the end: {os.getloadavg()[0]:.1f} (seconds include "
        "process start and are only comparable within one quiet run).\n\n"
        + markdown_table(header, rows)
    )
    write_section("user_text_cli", "Every calibrated method through the CLI on a user's model "
                  "and text", body)


if __name__ == "__main__":
    main()
