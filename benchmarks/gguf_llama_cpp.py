"""GGUF export checked by llama.cpp itself: logits of the f16 file, perplexity of Q8_0 / Q4_0 /
Q4_1.

Model: ``code-llama-tiny`` (``--size``). Files are written by ``sl.export(format="gguf")`` and
run by llama.cpp through llama-cpp-python (``logits_all``: the logits of every position).

* **f16 logits**: ``--prompts`` test windows of ``--prompt-len`` tokens; the largest absolute
  difference between llama.cpp's logits and the float32 torch model's, over every position
  and vocabulary entry, per prompt (the target: ≤ 1e-2).
* **quantized perplexity**: slimline ``gptq`` (and ``rtn``) with llama.cpp's block grid —
  symmetric, groups of 32 — at 8 and 4 bits, written code for code as Q8_0 / Q4_0, and
  asymmetric 4-bit groups of 32 (``gptq`` asymmetric, ``hqq``) as Q4_1; test
  perplexity of the torch model and of llama.cpp on the same ``--windows`` test windows
  (next-token NLL of every position after the first), and their relative difference (the
  target: within 0.5%). Under Q4_0 / Q4_1 the exporter writes the embedding and output as Q8_0, as
  llama.cpp's quantizer does; the torch rows keep them float32, so that part of the
  difference is rounding the export adds, and the table says which layers were exact.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import slimline as sl
from benchmarks.harness import conditions_line, markdown_table, print_table, write_section
from slimline.models import load_builtin

SECTION = "gguf-llama-cpp"
TITLE = "GGUF export through llama.cpp: code-llama-tiny"
QUANTIZED = {
    "gptq int8 g32 → Q8_0": ({"method": "gptq", "bits": 8, "group_size": 32}, "q8_0"),
    "gptq int4 g32 → Q4_0": ({"method": "gptq", "bits": 4, "group_size": 32}, "q4_0"),
    "rtn int4 g32 → Q4_0": ({"method": "rtn", "bits": 4, "group_size": 32}, "q4_0"),
    "gptq int4 g32 asymmetric → Q4_1": ({"method": "gptq", "bits": 4, "group_size": 32,
                                          "symmetric": False}, "q4_1"),
    "hqq int4 g32 → Q4_1": ({"method": "hqq", "bits": 4, "group_size": 32}, "q4_1"),
}


def llama(file: Path, context: int, threads: int) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(file), n_ctx=context, n_batch=context, n_ubatch=context,
                 n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)


def llama_logits(llm: Any, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of ``tokens`` (float32, positions × vocabulary)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def torch_logits(model: nn.Module, tokens: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=tokens.unsqueeze(0)).logits[0].float().numpy()


def nll(logits: np.ndarray, tokens: np.ndarray) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods (float64) and how many tokens."""
    x = logits[:-1].astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=1))
    chosen = x[np.arange(len(x)), tokens[1:]]
    return float((log_z - chosen).sum()), len(x)


def perplexities(model: nn.Module, llm: Any, windows: list[torch.Tensor]) -> tuple[float, float]:
    """(torch, llama.cpp) perplexity over ``windows``."""
    sums = {"torch": 0.0, "llama.cpp": 0.0}
    count = 0
    for w in windows:
        ids = w.numpy()
        s, n = nll(torch_logits(model, w), ids)
        sums["torch"] += s
        sums["llama.cpp"] += nll(llama_logits(llm, w.tolist()), ids)[0]
        count += n
    return math.exp(sums["torch"] / count), math.exp(sums["llama.cpp"] / count)


def export(model: nn.Module, directory: Path, dtype: str, example: torch.Tensor,
           tokenizer: Any) -> Any:
    return sl.export(model, directory, format="gguf", example={"input_ids": example},
                     dtype=dtype, tokenizer=tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=32, help="test windows for perplexity")
    parser.add_argument("--calibration", type=int, default=16, help="train batches of 8 (gptq)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    built = load_builtin("code-llama-tiny", size=args.size)
    model, tokenizer = built.model, built.tokenizer
    test = [b["input_ids"][0] for b in built.batches("test", batch_size=1, limit=args.windows)]
    context = max(len(w) for w in test)
    calibration = built.batches("train", batch_size=8, limit=args.calibration)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts = [w[: args.prompt_len] for w in test[: args.prompts]]
        export(model, Path(tmp) / "f16", "f16", prompts[0].unsqueeze(0), tokenizer)
        llm = llama(Path(tmp) / "f16" / "model.gguf", context, args.threads)
        diffs = [float(np.abs(llama_logits(llm, p.tolist()) - torch_logits(model, p)).max())
                 for p in prompts]
        scale = max(float(np.abs(torch_logits(model, p)).max()) for p in prompts)
        del llm
        header = ["prompt", "max abs diff of logits (llama.cpp f16 vs torch fp32)"]
        rows: list[list[Any]] = [[i, f"{d:.2e}"] for i, d in enumerate(diffs)]
        rows.append(["max", f"{max(diffs):.2e} ({'≤' if max(diffs) <= 1e-2 else '>'} 1e-2)"])
        print_table("f16 logits", header, rows)
        parts.append(f"f16 file, {len(prompts)} test prompts of {args.prompt_len} tokens "
                     f"(torch logits up to {scale:.1f} in magnitude):\n\n"
                     + markdown_table(header, rows))
        dense = perplexities(model, llama(Path(tmp) / "f16" / "model.gguf", context,
                                          args.threads), test)
        header = ["weights", "slimline (torch) ppl", "llama.cpp ppl", "llama.cpp / torch − 1",
                  "exact layers", "re-encoded", "method s"]
        rows = [["float (f16 file)", f"{dense[0]:.3f}", f"{dense[1]:.3f}",
                 f"{dense[1] / dense[0] - 1:+.3%}", "-", "-", "-"]]
        for label, (step, dtype) in QUANTIZED.items():
            start = time.perf_counter()
            quantized = sl.compress(model, {"steps": [step]}, calibration=calibration).model
            seconds = time.perf_counter() - start
            report = export(quantized, Path(tmp) / dtype / step["method"], dtype,
                            prompts[0].unsqueeze(0), tokenizer)
            llm = llama(Path(tmp) / dtype / step["method"] / "model.gguf", context, args.threads)
            ppl = perplexities(quantized, llm, test)
            del llm
            details = report.details
            rows.append([label, f"{ppl[0]:.3f}", f"{ppl[1]:.3f}", f"{ppl[1] / ppl[0] - 1:+.3%}",
                         len(details["exact_codes"]),
                         ", ".join(details["re_encoded"]) or "none", f"{seconds:.0f}"])
            print(rows[-1], flush=True)
        print_table("perplexity", header, rows)
        parts.append(f"Test perplexity on {len(test)} windows of {context} tokens "
                     f"(calibration: {args.calibration} train batches of 8):\n\n"
                     + markdown_table(header, rows))
    from importlib.metadata import version

    body = (conditions_line(args.threads, windows=len(test))
            + f". llama-cpp-python {version('llama_cpp_python')}, gguf {version('gguf')}, "
            f"code-llama-tiny ({args.size}).\n\n" + "\n\n".join(parts))
    print(body)
    if not args.no_write and args.size == "full":
        write_section(SECTION, TITLE, body)


if __name__ == "__main__":
    main()
