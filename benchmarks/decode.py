"""Batch-1 greedy decode: transformers fp32 / bf16 against slimline's packed int8 / int4 layers.

Model: ``llama-1b-random`` (TinyLlama-1.1B's shapes, random weights: a table for speed and
memory only, never quality; ``--layers`` keeps fewer blocks), ``qwen3-0.6b-random`` (Qwen3-0.6B's
shapes — per-head q/k RMSNorms, head_dim 128, the output head tied to the 151,936-row
embedding — random weights the same way) or ``code-llama-tiny``. Rows (one
process, each row a fresh copy of the model but twins (below), runs interleaved A B C … after
warm-up rounds; ``--warmup-tokens`` shortens those):

- ``fp32``: transformers as loaded; ``bf16``: ``model.to(torch.bfloat16)``;
- ``int8``: slimline ``rtn`` 8-bit per-channel; ``int4``: ``rtn`` 4-bit groups of 128 (float32
  activations: what a recipe of just ``rtn`` gives); ``int4-half``: ``rtn`` int4 g128 then
  ``half`` (bfloat16 activations); ``int8-a8`` / ``int4-a8`` / ``int4-g32-a8``: the same
  grids (g32: Q4_0's) with ``decode_activations: int8`` (x rounded to int8 in blocks of 32,
  integer dot products: llama.cpp's arithmetic); ``gptq8-a8`` / ``gptq4-a8``: ``gptq`` weights
  on those grids (calibration: code-llama-tiny's train split, or 8 x 128 random tokens for
  llama-1b-random), int8 activations. Quantizers take slimline's default targets (every
  Linear but the output head; ``--quantize-head`` takes the head too);
- ``fp32-onednn`` / ``bf16-onednn``: the fp32 / bf16 rows with slimline's ``onednn`` step
  (Linear layers on oneDNN's matmul, bf16 weights reordered for it; the head too with
  ``--quantize-head``);
- ``llama.cpp-f16`` / ``-q8_0`` / ``-q4_0``: the anchor, llama.cpp through llama-cpp-python on
  the same float32 weights, written by ``sl.export(format="gguf")`` (cached under
  ``$SLIMLINE_CACHE/gguf``; the random models take code-llama-tiny's tokenizer, which decode
  never uses; a tied head is written once, as llama.cpp's converter does), greedy (top_k 1), the same prompt ids, thread count and token count;
- ``int8-half`` / ``gptq4-half``: rtn int8 per-channel / gptq int4 g128 then ``half``
  (bfloat16 activations: on a GPU, what torch's weight-only CUDA kernels take);
- ``--speculative MODE``: each slimline row again with a ``speculative`` step appended
  (greedy output unchanged; ``self`` mode picks its skipped blocks on train batches);
- ``--fast-decode``: each slimline row (speculative ones too) again with a ``fast_decode``
  step (one-token steps through the written-out block loop, ``slimline.compile.fast_decode``).
  Both are twins: the very model instance of the row without the step, the step switched on
  for the twin's own calls only (the rows differ by the step alone, at no extra memory).

Columns:

- tokens/s: decode tokens per second: the tokens added between the first and the last call of
  a stopping criterion over the time between them (``generate`` calls it once per step, a
  speculative one once per verified chunk; llama.cpp: a timestamp per yielded token), median
  over runs; prefill: from the call to that first timestamp (prompt forward and first token;
  for a speculative row, its first verified chunk), median;
- bytes/token: weights one decode step reads (``slimline.evaluate.bandwidth``: every stored
  parameter and buffer, one row of the embedding; llama.cpp: the GGUF's tensor bytes, one
  row of ``token_embd``); bound: best measured streaming-read
  bandwidth (a 512 MiB ``sum`` at the same thread count) over those bytes; fraction: tokens/s
  over the bound;
- path: the matmul slimline's quantized layers run at one row (``gemv``: its own kernel;
  ``onednn``: the onednn step's);
- drafts accepted, tokens/forward (``--speculative``): over the timed runs, the share of
  drafted tokens the target kept and the tokens each verify forward emitted (the model's
  ``speculative_stats``; "-" for a row that does not speculate);
- peak RSS (``--memory``): each row in a child process of its own, the resident-set
  high-water mark over one ``generate`` (model resident, interpreter included), after the
  heap freed while making the row is handed back (``malloc_trim``); a twin's is its base
  row's ("with base").

Device (``--device cuda``): each row is made on the CPU, then moved to the GPU; the prompt
and the KV cache live there, every clock read follows a device synchronisation, the streaming
read is of GPU memory (``--bandwidth-mib``: make it many times the L2 cache), and peak memory
(``--memory``) is ``torch.cuda.max_memory_allocated`` over one ``generate`` in a child process.
Packed layers run torch's CUDA weight-only kernels where they fit
(``slimline.quantize.kernels_cuda``: int4 needs bfloat16 activations, hence the ``-half``
rows). llama.cpp rows and ``--fast-decode`` (slimline's CPU decode loop) are CPU-only.

Cache (``--modes``): ``default`` leaves the cache to the model's ``generation_config``
(transformers' dynamic one unless it names another; the column says which); ``dynamic`` /
``static`` ask ``generate`` for that one; ``static+compile`` adds ``torch.compile`` of the
decode step (transformers' ``compile_config``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import slimline as sl
from benchmarks.harness import (
    conditions_line,
    isa_suffix,
    markdown_table,
    print_table,
    write_section,
)
from benchmarks.peers import settle_memory
from slimline.compile.onednn import OneDNNForward
from slimline.evaluate.bandwidth import (
    bandwidth_bound,
    decode_bytes_per_token,
    streaming_read_bandwidth,
)
from slimline.evaluate.bench import peak_memory_during
from slimline.quantize.qlinear import QuantLinear

MiB = 2**20
MODES = ("default", "dynamic", "static", "static+compile")
RTN8 = {"method": "rtn", "bits": 8, "group_size": None}
RTN4 = {"method": "rtn", "bits": 4, "group_size": 128}
A8 = {"decode_activations": "int8"}
HALF = {"method": "half", "dtype": "bfloat16"}
GPTQ8 = {"method": "gptq", "bits": 8, "group_size": None}
GPTQ4 = {"method": "gptq", "bits": 4, "group_size": 128}
ONEDNN = {"method": "onednn"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row: its label and how it turns the float32 model into the measured one."""

    label: str
    steps: tuple[dict[str, Any], ...] = ()
    cast: torch.dtype | None = None
    gguf: str | None = None  # a llama.cpp row: the GGUF dtype it runs


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("transformers fp32"),
    "bf16": Variant("transformers bf16", cast=torch.bfloat16),
    "fp32-onednn": Variant("transformers fp32 + slimline onednn", (ONEDNN,)),
    "bf16-onednn": Variant("transformers bf16 + slimline onednn", (ONEDNN,), cast=torch.bfloat16),
    "int8": Variant("slimline rtn int8 per-channel (fp32 activations)", (RTN8,)),
    "int4": Variant("slimline rtn int4 g128 (fp32 activations)", (RTN4,)),
    "int4-half": Variant("slimline rtn int4 g128 + half bf16", (RTN4, HALF)),
    "int8-a8": Variant("slimline rtn int8 per-channel, int8 activations", ({**RTN8, **A8},)),
    "int4-a8": Variant("slimline rtn int4 g128, int8 activations", ({**RTN4, **A8},)),
    "int4-g32-a8": Variant("slimline rtn int4 g32, int8 activations",
                           ({**RTN4, "group_size": 32, **A8},)),
    "gptq8-a8": Variant("slimline gptq int8 per-channel, int8 activations", ({**GPTQ8, **A8},)),
    "gptq4-a8": Variant("slimline gptq int4 g128, int8 activations", ({**GPTQ4, **A8},)),
    "int8-half": Variant("slimline rtn int8 per-channel + half bf16", (RTN8, HALF)),
    "gptq4-half": Variant("slimline gptq int4 g128 + half bf16", (GPTQ4, HALF)),
    "llama.cpp-f16": Variant("llama.cpp f16", gguf="f16"),
    "llama.cpp-q8_0": Variant("llama.cpp Q8_0", gguf="q8_0"),
    "llama.cpp-q4_0": Variant("llama.cpp Q4_0", gguf="q4_0"),
}
SPECULATIVE_SUFFIX = "+speculative"
FAST_SUFFIX = "+fast_decode"


@dataclasses.dataclass
class Row:
    """A built row: a timed decode of n tokens (prefill seconds, tokens/s), bytes, path, and
    the KV cache its generate uses."""

    decode: Callable[[int], tuple[float, float]]
    bytes: int
    path: str
    cache: str
    model: nn.Module | None = None  # a slimline row's model (None: llama.cpp)
    prompt: torch.Tensor | None = None
    installs: dict[str, Any] = dataclasses.field(default_factory=dict)  # a twin's methods


class StepClock:
    """A stopping criterion that never stops, and notes when it was called and at what length."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.lengths: list[int] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **_: Any) -> torch.Tensor:
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)  # the step's kernels have finished
        self.times.append(time.perf_counter())
        self.lengths.append(input_ids.shape[1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def qwen3_random(layers: int | None) -> nn.Module:
    """A ``Qwen3ForCausalLM`` with Qwen3-0.6B's shapes, filled as ``llama-1b-random`` is."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    from slimline.models.llama_random import build_random

    config = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                         num_hidden_layers=layers or 28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})  # fmt: skip
    model: nn.Module = build_random(Qwen3ForCausalLM, config, Qwen3RotaryEmbedding)
    return model


def base_model(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    """A fresh float32 model and the (1, prompt) token ids."""
    if args.model == "qwen3-0.6b-random":
        from slimline.models.llama_random import random_tokens

        return qwen3_random(args.layers), random_tokens(151936, sequences=1, length=args.prompt)["input_ids"]
    if args.model == "llama-1b-random":
        from slimline.models.llama_random import SHAPES, build_llama_random, random_tokens

        shape = SHAPES["full"]
        if args.layers is not None:
            shape = dataclasses.replace(shape, num_layers=args.layers)
        prompt = random_tokens(shape.vocab_size, sequences=1, length=args.prompt)["input_ids"]
        return build_llama_random(shape), prompt
    from slimline.models import load_builtin

    built = load_builtin(args.model)
    ids = built.batches("test", batch_size=1, limit=1)[0]["input_ids"]
    if ids.shape[1] < args.prompt:
        raise SystemExit(f"{args.model}: test windows have {ids.shape[1]} tokens < --prompt")
    return built.model, ids[:, : args.prompt]


def variant_of(row: str) -> tuple[Variant, bool]:
    """The row's variant, and whether it speculates."""
    name = row.removesuffix(FAST_SUFFIX).removesuffix(SPECULATIVE_SUFFIX)
    return VARIANTS[name], SPECULATIVE_SUFFIX in row


def fast_of(row: str) -> bool:
    """Whether the row adds slimline's ``fast_decode`` step."""
    return row.endswith(FAST_SUFFIX)


def prepare(row: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The row's model, made in place from the fresh float32 one."""
    variant, speculates = variant_of(row)
    if variant.cast is not None:
        model = model.to(variant.cast)
    steps = [dict(s) for s in variant.steps]
    if args.quantize_head:
        for step in steps:
            if step["method"] in ("rtn", "gptq", "onednn"):
                step["targets"] = {"include": ["*"]}
    if speculates:
        steps.append(speculative_step(args))
    if fast_of(row):
        steps.append({"method": "fast_decode"})
    if steps:
        calibrated = any(step["method"] == "gptq" for step in steps)
        model = sl.compress(model, {"steps": steps}, calibration=calibration(args, calibrated),
                            inplace=True).model
    return model.to(args.device)


def speculative_step(args: argparse.Namespace) -> dict[str, Any]:
    """The ``speculative`` step of ``--speculative`` rows."""
    return {"method": "speculative", "mode": args.speculative, "gamma": args.gamma,
            "adaptive": args.adaptive}


def calibration(args: argparse.Namespace, calibrated: bool = False) -> list[Any] | None:
    """Train batches for a gptq row (``calibrated``: 8 x 128 random tokens for
    llama-1b-random, whose weights are random anyway) or a speculative ``self`` row (its
    skipped blocks), else None."""
    if calibrated and args.model == "llama-1b-random":
        from slimline.models.llama_random import SHAPES, random_tokens

        return [random_tokens(SHAPES["full"].vocab_size, sequences=8, length=128, seed=1)]
    if not calibrated and (args.speculative != "self" or args.model == "llama-1b-random"):
        return None
    from slimline.models import load_builtin

    return load_builtin(args.model).batches("train", batch_size=8, limit=4)


def gguf_file(args: argparse.Namespace, dtype: str) -> Path:
    """The float32 model written as GGUF ``dtype`` by slimline's exporter, cached."""
    from slimline.models import load_builtin
    from slimline.models.cache import cache_root

    layers = "" if args.layers is None else f"-{args.layers}layers"
    directory = cache_root() / "gguf" / f"{args.model}{layers}-{dtype}"
    if not (directory / "model.gguf").is_file():
        model, prompt = base_model(args)
        tokenizer = load_builtin("code-llama-tiny", size="small").tokenizer
        start = time.perf_counter()
        # Random weights through many blocks amplify rounding: the random models' files read
        # back below the default bounds (set on trained models) under q8_0 / q4_0. These rows
        # measure speed only, on the file's own weights, so the parity check is off for them;
        # the notes quote the cosine each file read back at (its export.json).
        loose = {"atol": 1e9, "min_cosine": -1.0} if args.model.endswith("-random") else {}
        sl.export(model, directory, format="gguf", example={"input_ids": prompt[:, :32]},
                  dtype=dtype, tokenizer=tokenizer, **loose)
        print(f"wrote {directory} in {time.perf_counter() - start:.0f} s", flush=True)
    return directory / "model.gguf"


def gguf_bytes_per_token(file: Path) -> int:
    """The GGUF's tensor bytes, ``token_embd`` counted one row (as decode_bytes_per_token) unless
    it is also the output head (no ``output.weight``: the whole matrix is read per token)."""
    from gguf import GGUFReader

    tensors = GGUFReader(file).tensors
    tied = "output.weight" not in {t.name for t in tensors}
    total = 0
    for tensor in tensors:
        rows = int(tensor.shape[1]) if len(tensor.shape) > 1 else 1
        one_row = tensor.name == "token_embd.weight" and not tied
        total += int(tensor.n_bytes) // rows if one_row else int(tensor.n_bytes)
    return total


def gguf_cosines(args: argparse.Namespace, rows: list[str]) -> str:
    """The lowest parity cosine each llama.cpp row's file read back at (from its export.json)."""
    found = []
    for row in rows:
        variant = VARIANTS.get(row.strip())
        dtype = variant.gguf if variant is not None else None
        if dtype is None:
            continue
        report = gguf_file(args, dtype).parent / "export.json"
        parity = json.loads(report.read_text())["parity"]
        found.append(f"{min(p['cosine'] for p in parity):.4f} under {dtype}")
    return ", ".join(found)


def llama_cpp_row(args: argparse.Namespace, dtype: str, prompt: torch.Tensor) -> Row:
    """A llama.cpp row: the GGUF loaded by llama-cpp-python, greedy from the same prompt ids."""
    from llama_cpp import Llama

    file = gguf_file(args, dtype)
    llm = Llama(model_path=str(file), n_ctx=args.prompt + args.new_tokens + 16,
                n_threads=args.threads, n_threads_batch=args.threads, n_batch=args.prompt,
                verbose=False)
    tokens = prompt[0].tolist()

    def decode(n: int) -> tuple[float, float]:
        llm.reset()  # no prefix reuse: every run evaluates the whole prompt
        times: list[float] = []
        start = time.perf_counter()
        for _ in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == n:
                break
        return times[0] - start, (len(times) - 1) / (times[-1] - times[0])

    return Row(decode, gguf_bytes_per_token(file), "llama.cpp", "llama.cpp")


def generate_kwargs(model: nn.Module, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """``generate``'s arguments for a row: greedy, ``--new-tokens`` new tokens exactly.

    The model's generation config with no end-of-sequence token, so that every run makes
    all its tokens without ``min_new_tokens``: its two logits processors cost ~0.3 ms a token
    in transformers 5.24 (an ``inspect.signature`` and a ``torch.isin`` each, every step), a
    quarter of code-llama-tiny's decode step with ``fast_decode``, which no user's generate
    pays and llama.cpp's row does not either."""
    eos = model.generation_config.eos_token_id
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    config.max_new_tokens, config.do_sample = args.new_tokens, False
    config.pad_token_id = eos if isinstance(eos, int) else 0
    if mode != "default":
        config.cache_implementation = mode.removesuffix("+compile")
    if mode == "static+compile":
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="default", fullgraph=False)
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless asked
        config.compile_config = compile_config
    return {"generation_config": config}


def new_tokens(kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """``kwargs`` (from :func:`generate_kwargs`) for ``n`` new tokens."""
    config = copy.deepcopy(kwargs["generation_config"])
    config.max_new_tokens = n
    return {**kwargs, "generation_config": config}


def decode_once(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy ``generate``."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             stopping_criteria=[clock], **kwargs)
    new = out.shape[1] - prompt.shape[1]
    wanted = kwargs["generation_config"].max_new_tokens
    if new != wanted or not clock.times or clock.lengths[-1] != out.shape[1]:
        raise RuntimeError(f"generate made {new} tokens, the clock saw {clock.lengths[-1:]}")
    decode_s = clock.times[-1] - clock.times[0]
    made = clock.lengths[-1] - clock.lengths[0]
    return clock.times[0] - start, made / decode_s if made else float("nan")


def decode_paths(model: nn.Module, prompt: torch.Tensor, kwargs: dict[str, Any]) -> str:
    """The matmuls slimline's packed layers ran for one-token inputs during a short generate."""
    paths: set[str] = set()

    def note(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0]
        if x.numel() == module.in_features:  # one token: a decode step
            paths.add(module.kernel_path(x))

    hooks = [m.register_forward_pre_hook(note) for m in model.modules() if isinstance(m, QuantLinear)]
    if any(isinstance(vars(m).get("forward"), OneDNNForward) for m in model.modules()):
        paths.add("onednn")
    try:
        decode_once(model, prompt, new_tokens(kwargs, 2))
    finally:
        for hook in hooks:
            hook.remove()
    return ", ".join(sorted(paths)) or "-"


def row_names(args: argparse.Namespace) -> list[tuple[str, str]]:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [r for r in rows if r not in VARIANTS] + [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown rows/modes {unknown}; rows: {list(VARIANTS)}, modes: {list(MODES)}")
    if args.speculative:
        rows += [r + SPECULATIVE_SUFFIX for r in rows if VARIANTS[r].gguf is None]
    if args.fast_decode:
        rows += [r + FAST_SUFFIX for r in rows if variant_of(r)[0].gguf is None]
    out = [(r, m) for m in modes for r in rows if variant_of(r)[0].gguf is None]
    return out + [(r, "llama.cpp") for r in rows if variant_of(r)[0].gguf is not None]


def build_row(args: argparse.Namespace, row: str, mode: str) -> Row:
    model, prompt = base_model(args)
    variant, _ = variant_of(row)
    if variant.gguf is not None:
        del model
        return llama_cpp_row(args, variant.gguf, prompt)
    model = prepare(row, model, args).eval()
    prompt = prompt.to(args.device)
    kwargs = generate_kwargs(model, args, mode)
    eager = generate_kwargs(model, args, "dynamic")  # hooks see eager calls only
    def decode(n: int) -> tuple[float, float]:
        return decode_once(model, prompt, new_tokens(kwargs, n))

    cache = kwargs["generation_config"].cache_implementation
    cache = (cache or "dynamic") + ("+compile" if mode == "static+compile" else "")
    return Row(decode, decode_bytes_per_token(model), decode_paths(model, prompt, eager), cache,
               model, prompt)


TWIN_ATTRS = ("forward", "generate")  # what the speculative and fast_decode steps set on an instance


def twin(args: argparse.Namespace, base: Row, mode: str, steps: list[dict[str, Any]]) -> Row:
    """``base``'s model with ``steps`` (``speculative``, ``fast_decode``) on for this row's
    calls only: the same instance (weights at the same addresses), so the two rows differ by
    the steps alone — separate copies of a model differ in speed by more than a step saves on
    this machine — and a twin costs no memory. The methods the steps set on the instance are
    taken off it and put back around each of this row's calls (with those of ``base``'s)."""
    model, prompt = base.model, base.prompt
    assert model is not None and prompt is not None
    sl.compress(model, {"steps": steps}, inplace=True)
    installs = {**base.installs, **{k: vars(model).pop(k) for k in TWIN_ATTRS if k in vars(model)}}
    kwargs = generate_kwargs(model, args, mode)

    def decode(n: int) -> tuple[float, float]:
        vars(model).update(installs)
        try:
            return decode_once(model, prompt, new_tokens(kwargs, n))
        finally:
            for name in installs:
                vars(model).pop(name)

    return Row(decode, base.bytes, base.path, base.cache, model, prompt, installs)


def twin_of(args: argparse.Namespace, name: str) -> tuple[str, list[dict[str, Any]]]:
    """The row a twin row is made from (``name`` without its last suffix) and the steps it
    adds; ``(name, [])`` for a row that is no twin."""
    if fast_of(name):
        return name.removesuffix(FAST_SUFFIX), [{"method": "fast_decode"}]
    if name.endswith(SPECULATIVE_SUFFIX):
        return name.removesuffix(SPECULATIVE_SUFFIX), [speculative_step(args)]
    return name, []


def measure_rows(args: argparse.Namespace) -> dict[tuple[str, str], dict[str, Any]]:
    """Build every row's model, then time them interleaved (warm-up rounds of
    ``--warmup-tokens`` new tokens, then ``--runs`` rounds of ``--new-tokens``)."""
    for name, _ in row_names(args):  # the GGUF files first, before rows fill the memory
        variant = variant_of(name)[0]
        if variant.gguf is not None:
            gguf_file(args, variant.gguf)
            settle_memory()
    built: dict[tuple[str, str], Row] = {}
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for key in row_names(args):
        start = time.perf_counter()
        name, mode = key
        base, steps = twin_of(args, name)
        built[key] = twin(args, built[(base, mode)], mode, steps) if steps else build_row(args, *key)
        settle_memory()  # hand back the heap the float32 copy used: every row stays resident
        results[key] = {"bytes": built[key].bytes, "path": built[key].path, "cache": built[key].cache,
                        "build_s": time.perf_counter() - start, "prefill": [], "tps": [],
                        "twin": bool(steps)}
        print(f"built {key[0]} ({key[1]}) in {results[key]['build_s']:.1f} s", flush=True)
    for round_index in range(args.warmup + args.runs):
        start, warm = time.perf_counter(), round_index < args.warmup
        for key, row in built.items():
            before = speculation_counts(row.model)
            prefill, tps = row.decode(args.warmup_tokens if warm else args.new_tokens)
            if not warm:
                results[key]["prefill"].append(prefill)
                results[key]["tps"].append(tps)
                after = speculation_counts(row.model)
                counts = results[key].setdefault("speculation", [0, 0, 0, 0])
                for i, (a, b) in enumerate(zip(after, before, strict=True)):
                    counts[i] += a - b
        print(f"round {round_index + 1}/{args.warmup + args.runs} done in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return results


def speculation_counts(model: nn.Module | None) -> tuple[int, int, int, int]:
    """(drafted, accepted, verify rounds, tokens those rounds emitted) a speculative model has
    counted so far (``speculative_stats``); zeros for any other row."""
    stats = getattr(model, "speculative_stats", None)
    if stats is None:
        return 0, 0, 0, 0
    return stats.drafted, stats.accepted, stats.rounds, stats.new_tokens - stats.prefills


def child_peak(args: argparse.Namespace, row: str, mode: str) -> int | str:
    """Peak RSS of one row's generate, in a process of its own (MEASURING.md, memory)."""
    command = [sys.executable, "-m", "benchmarks.decode", "--child", f"{row}:{mode}",
               "--model", args.model, "--prompt", str(args.prompt), "--new-tokens",
               str(args.new_tokens), "--threads", str(args.threads),
               "--gamma", str(args.gamma)]  # fmt: skip
    if args.speculative:
        command += ["--speculative", args.speculative]
    if args.adaptive:
        command.append("--adaptive")
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    if args.quantize_head:
        command.append("--quantize-head")
    command += ["--device", args.device]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"
    peak: int = json.loads(done.stdout.strip().splitlines()[-1])["peak_rss"]
    return peak


def run_child(args: argparse.Namespace) -> None:
    row, mode = args.child.split(":")
    built = build_row(args, row, mode)
    built.decode(2)  # warm-up
    settle_memory()  # the float32 model this row was made from is gone: hand its heap back
    peak = peak_memory_during(lambda: built.decode(args.new_tokens), torch.device(args.device))
    print(json.dumps({"peak_rss": peak.bytes, "method": peak.method}))


def table(args: argparse.Namespace, results: dict[tuple[str, str], dict[str, Any]],
          bandwidth: float, peaks: dict[tuple[str, str], int | str]) -> tuple[list[str], list[list[Any]]]:
    header = ["row", "cache", "tokens/s", "× fp32", "prefill ms", "weights MiB/token",
              "bound tokens/s", "fraction of bound", "path"]  # fmt: skip
    if args.speculative:
        header += ["drafts accepted", "tokens/forward"]
    if peaks:
        header.append("peak RSS MiB" if args.device == "cpu" else "peak CUDA memory MiB")
    base = {m: statistics.median(r["tps"]) for (row, m), r in results.items() if row == "fp32"}
    base["llama.cpp"] = base.get("default", float("nan"))  # against transformers as it comes
    rows: list[list[Any]] = []
    for (row, mode), r in results.items():
        tps = statistics.median(r["tps"])
        bound = bandwidth_bound(r["bytes"], bandwidth)
        ratio = f"{tps / base[mode]:.2f}" if mode in base else "-"
        variant, speculates = variant_of(row)
        label = variant.label + (f" + speculative {args.speculative}"
                                 + (" adaptive" if args.adaptive else "") if speculates else "")
        label += " + fast_decode" if fast_of(row) else ""
        line = [label, r["cache"], f"{tps:.2f}", ratio,
                f"{1e3 * statistics.median(r['prefill']):.0f}", f"{r['bytes'] / MiB:.0f}",
                f"{bound:.1f}", f"{tps / bound:.0%}", r["path"]]  # fmt: skip
        if args.speculative:
            drafted, accepted, rounds, emitted = r.get("speculation", (0, 0, 0, 0))
            line += ([f"{accepted / drafted:.0%}" if drafted else "none drafted",
                      f"{emitted / rounds:.2f}"] if rounds else ["-", "-"])
        if peaks:
            peak = peaks[(row, mode)]
            line.append(f"{peak / MiB:.0f}" if isinstance(peak, int) else peak)
        rows.append(line)
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-1b-random",
                        choices=("llama-1b-random", "qwen3-0.6b-random", "code-llama-tiny"))
    parser.add_argument("--layers", type=int, default=None, help="llama-1b-random / qwen3-0.6b-random: keep this many blocks")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--warmup-tokens", type=int, default=None,
                        help="new tokens in a warm-up round (default --new-tokens)")
    parser.add_argument("--rows", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--modes", default="default", help=f"comma list of {list(MODES)}")
    parser.add_argument("--quantize-head", action="store_true",
                        help="rtn and gptq quantize the output head too (onednn takes it too)")
    parser.add_argument("--memory", action="store_true", help="peak RSS of each row in a child process")
    parser.add_argument("--speculative", choices=("prompt_lookup", "self", "draft"), default=None,
                        help="each slimline row again with this speculative mode")
    parser.add_argument("--fast-decode", action="store_true",
                        help="each slimline row (speculative ones too) again with the fast_decode step")
    parser.add_argument("--gamma", type=int, default=5, help="speculative draft length")
    parser.add_argument("--adaptive", action="store_true",
                        help="speculative rows choose their draft length from what they measure")
    parser.add_argument("--bandwidth-mib", type=int, default=512)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the rows run (llama.cpp rows and --fast-decode: cpu only)")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--section-suffix", default="",
                        help="write BENCHMARKS section decode-MODEL<SUFFIX>-Nt (e.g. -speculative), beside the full table")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode speed is timed between tokens)")
    args.warmup_tokens = args.warmup_tokens or args.new_tokens
    if args.warmup_tokens < 2:
        raise SystemExit("--warmup-tokens must be at least 2")
    if "compile" in args.modes and (args.warmup < 1 or args.warmup_tokens != args.new_tokens):
        raise SystemExit("static+compile needs a full-length warm-up (--warmup >= 1, no "
                         "--warmup-tokens): the first generate of each length compiles")
    cpu_only = [r for r in args.rows.split(",") if r.strip().startswith("llama.cpp")]
    if args.device == "cuda" and not args.child:  # a child gets its one row by --child
        if cpu_only or args.fast_decode:
            what = ", ".join(cpu_only) or "--fast-decode"
            raise SystemExit(f"--device cuda: {what} run(s) on the CPU only")
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no GPU")
    torch.set_num_threads(args.threads)
    if args.child:
        run_child(args)
        return
    reads = streaming_read_bandwidth(args.bandwidth_mib * MiB, device=args.device)
    results = measure_rows(args)
    again = streaming_read_bandwidth(args.bandwidth_mib * MiB, device=args.device)  # may have changed
    bandwidth = max(reads.best_bytes_per_s, again.best_bytes_per_s)
    # A twin is its base row's instance with a step switched on: measured with its base.
    peaks = {key: "with base" if r["twin"] else child_peak(args, *key)
             for key, r in results.items()} if args.memory else {}
    header, rows = table(args, results, bandwidth, peaks)
    title = f"Batch-1 greedy decode, {args.model}"
    print_table(title, header, rows)
    medians = ", ".join(f"{r.median_bytes_per_s / 1e9:.1f}" for r in (reads, again))
    shape = "" if args.layers is None else f" ({args.layers} layers)"
    where = f"{args.threads} threads" if args.device == "cpu" else "GPU memory"
    notes = (f"{conditions_line(args.threads, args.device, batch_size=1, prompt=args.prompt, new_tokens=args.new_tokens, runs=args.runs)}.\n\n"
             f"Model: {args.model}{shape}" + (" — random weights: speed and memory only, never quality" if args.model.endswith("-random") else "")
             + ((" (the output head, tied to the embedding, " + ("packed by the quantized rows too)" if args.quantize_head else "kept float32)")) if args.model == "qwen3-0.6b-random" else "")
             + (f". llama.cpp rows: GGUF files written with the parity check off (random weights read back at cosine {gguf_cosines(args, cpu_only)})" if args.model.endswith("-random") and cpu_only else "")
             + f". Streaming read (sum of {args.bandwidth_mib} MiB, {where}): best {bandwidth / 1e9:.1f} GB/s"
             f" (medians {medians} GB/s, before and after the rows); the bound divides it by each row's weight bytes per token.\n")
    print(notes)
    if not args.no_write:
        place = f"{args.threads}t{isa_suffix()}" if args.device == "cpu" else "cuda"
        on = f"{args.threads} thread(s)" if args.device == "cpu" else "CUDA"
        write_section(f"decode-{args.model}{args.section_suffix}-{place}",
                      f"{title}{args.section_suffix.replace('-', ' ')}, {on}",
                      notes + "\n" + markdown_table(header, rows))


if __name__ == "__main__":
    main()
