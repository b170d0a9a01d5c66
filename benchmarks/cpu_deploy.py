"""CPU deployment: slimline's torch path and runtime backends against OpenVINO (+NNCF), ONNX
Runtime and torchao, in one process.

Models (``--model``): the built-in ``minilm`` (all-MiniLM-L6-v2's shapes; 32 sentences a batch,
padded to the batch's longest), ``digits-cnn`` (64 images) and ``code-llama-tiny`` (prefill:
batch 1 × 256 tokens). Rows, timed interleaved on one test batch:

* torch fp32 eager, and + ``torch.compile`` (inductor);
* the peers as a user runs them: the fp32 model converted to OpenVINO IR (by ``sl.export``;
  the same graph a user's ``ov.convert_model`` of a ``torch.export`` program gives), compiled
  by OpenVINO with the f32 and the bf16 precision hint, and quantized by NNCF's
  ``nncf.quantize`` (``ModelType.TRANSFORMER``, ``--calib-batches`` train batches; run with
  either hint); the model
  exported to ONNX and run by ONNX Runtime, as it is and after ``quantize_dynamic`` (int8
  weights);
* torchao's int8 dynamic-activation, int8-weight quantization + ``torch.compile``;
* slimline recipes: ``compile`` with each backend (inductor also with ``freezing``),
  ``int8_dynamic`` and static ``smoothquant`` in torch (eager and + inductor, also with
  ``attention: eager`` for transformers models), ``int8_dynamic``
  and ``smoothquant`` (dynamic and static activations) + ``compile backend: openvino`` in
  float32 and with ``precision: bf16`` and + ``compile backend: onnxruntime`` (int8 GEMMs:
  ``MatMulInteger``), ``half`` (bf16) + inductor, ``unpad`` (BERT-like encoders: the real
  tokens only) alone and under these quantizers + inductor, and the named recipes in
  ``recipes/`` (``--recipes``).

The timed batch is padded to its longest sentence, as a user's batch is; the conditions line
says how much of it is padding. ``--sort-by-length`` batches the sentences by length first (as
sentence-transformers' ``encode`` does, which leaves less padding for ``unpad`` to remove) and
times all of them.

Quality: mean cosine to torch fp32 on ``--batches`` test batches (an encoder's mean-pooled
embeddings, a classifier's or a causal LM's logits). Each runtime gets ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import slimline as sl
from benchmarks.harness import (
    ROOT,
    conditions_line,
    interleaved,
    isa_suffix,
    markdown_table,
    print_table,
    write_section,
)
from slimline.compile.inductor import has_attention_switch
from slimline.compile.unpad import UnpadConfig
from slimline.core.batches import forward, mean_pool, output_tensor
from slimline.export.openvino import check_compiles
from slimline.models import load_builtin

# Batch sizes: a sentence encoder's batch, an image classifier's, a causal LM's prefill.
BATCH_SIZE = {"minilm": 32, "digits-cnn": 64, "code-llama-tiny": 1}
RECIPES = {"minilm": "encoder-cpu-lossless,encoder-cpu-lossless-openvino,encoder-cpu-fast"}
QUALITY = {
    "minilm": "mean cosine of the mean-pooled embeddings to torch fp32",
    "digits-cnn": "mean cosine of the logits to torch fp32",
    "code-llama-tiny": "mean cosine of each position's logits to torch fp32",
}
Embed = Callable[[dict[str, torch.Tensor]], torch.Tensor]
SQ_STATIC = {"method": "smoothquant", "activations": "static", "alpha": None}
OPENVINO = {"method": "compile", "backend": "openvino"}
OPENVINO_BF16 = {**OPENVINO, "precision": "bf16"}
INDUCTOR = {"method": "compile"}
ONNXRUNTIME = {"method": "compile", "backend": "onnxruntime"}
EAGER_ATTENTION = {"method": "compile", "attention": "eager"}  # transformers models only
# the model's own attention (torch's SDPA with the padding mask): compile's default for
# encoders is slimline's kernel over each row's real keys (compile/encoder_attention.py)
SDPA_ATTENTION = {"method": "compile", "attention": "model"}
UNPAD = {"method": "unpad"}  # BERT-like encoders only
SLIMLINE_ROWS: dict[str, list[dict[str, Any]]] = {
    "slimline compile (inductor)": [INDUCTOR],
    "slimline compile (inductor, freezing)": [{"method": "compile", "freezing": True}],
    "slimline int8_dynamic + compile": [{"method": "int8_dynamic"}, INDUCTOR],
    "slimline int8_dynamic + compile freezing": [{"method": "int8_dynamic"},
                                                 {"method": "compile", "freezing": True}],
    "slimline smoothquant static (eager)": [SQ_STATIC],
    "slimline smoothquant static + compile": [SQ_STATIC, INDUCTOR],
    "slimline int8_dynamic + compile, eager attention": [{"method": "int8_dynamic"}, EAGER_ATTENTION],
    "slimline smoothquant static + compile, eager attention": [SQ_STATIC, EAGER_ATTENTION],
    "slimline int8_dynamic + compile, sdpa attention": [{"method": "int8_dynamic"}, SDPA_ATTENTION],
    "slimline smoothquant static + compile, sdpa attention": [SQ_STATIC, SDPA_ATTENTION],
    "slimline compile backend openvino": [OPENVINO],
    "slimline compile backend onnxruntime": [ONNXRUNTIME],
    "slimline int8_dynamic + compile openvino": [{"method": "int8_dynamic"}, OPENVINO],
    "slimline smoothquant + compile openvino": [{"method": "smoothquant"}, OPENVINO],
    "slimline smoothquant static + compile openvino": [SQ_STATIC, OPENVINO],
    "slimline int8_dynamic + compile onnxruntime": [{"method": "int8_dynamic"}, ONNXRUNTIME],
    "slimline smoothquant + compile onnxruntime": [{"method": "smoothquant"}, ONNXRUNTIME],
    "slimline smoothquant static + compile onnxruntime": [SQ_STATIC, ONNXRUNTIME],
    "slimline half (bf16) + compile": [{"method": "half"}, INDUCTOR],
    "slimline compile backend openvino bf16": [OPENVINO_BF16],
    "slimline int8_dynamic + compile openvino bf16": [{"method": "int8_dynamic"}, OPENVINO_BF16],
    "slimline smoothquant + compile openvino bf16": [{"method": "smoothquant"}, OPENVINO_BF16],
    "slimline smoothquant static + compile openvino bf16": [SQ_STATIC, OPENVINO_BF16],
    "slimline unpad (eager)": [UNPAD],
    "slimline unpad + compile": [UNPAD, INDUCTOR],
    "slimline half (bf16) + unpad + compile": [{"method": "half"}, UNPAD, INDUCTOR],
    "slimline int8_dynamic + unpad + compile": [{"method": "int8_dynamic"}, UNPAD, INDUCTOR],
    "slimline smoothquant static + unpad + compile": [SQ_STATIC, UNPAD, INDUCTOR],
    # per-token dynamic activations only on the layers static scales hurt most (BERT's
    # attention output and feed-forward down projections)
    "slimline smoothquant static, int8_dynamic on *output.dense + unpad + compile": [
        {**SQ_STATIC, "targets": {"exclude": ["*output.dense"]}},
        {"method": "int8_dynamic", "targets": {"include": ["*output.dense"]}}, UNPAD, INDUCTOR],
    # the same chosen by measurement: the layers that cost the output most go per-token
    # dynamic until a held-out quarter of the calibration data reaches the cosine
    "slimline smoothquant static min_cosine 0.9993 + unpad + compile": [
        {**SQ_STATIC, "min_cosine": 0.9993}, UNPAD, INDUCTOR],
    "slimline smoothquant static min_cosine 0.9995 + unpad + compile": [
        {**SQ_STATIC, "min_cosine": 0.9995}, UNPAD, INDUCTOR],
}


def answer(out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A runtime's first output as the torch rows give it (``output_tensor``): an encoder's
    hidden states (B, T, C) mean-pooled over the real tokens, logits as they are."""
    if out.dim() == 3 and "token_type_ids" in batch:  # BERT-like: last_hidden_state
        return mean_pool(out, batch["attention_mask"])
    return out


def torch_embed(model: nn.Module) -> Embed:
    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return output_tensor(forward(model, batch), batch).float()

    return embed


def openvino_embed(xml: Path, threads: int, precision: str | None = None,
                   model: Any | None = None) -> Embed:
    import openvino as ov

    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    if model is None:  # a known OpenVINO crash becomes a failed row, not a dead run
        check_compiles(xml, config)
    compiled = ov.Core().compile_model(model if model is not None else str(xml), "CPU", config)
    request = compiled.create_infer_request()
    names = [p.get_any_name() for p in compiled.inputs]

    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = request.infer({n: batch[n].numpy() for n in names})
        return answer(torch.from_numpy(np.array(out[compiled.outputs[0]])), batch)

    return embed


def nncf_int8(xml: Path, calibration: list[dict[str, torch.Tensor]], transformer: bool) -> Any:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    names = [p.get_any_name() for p in model.inputs]
    dataset = nncf.Dataset(calibration, lambda b: {n: b[n].numpy() for n in names})
    kind = nncf.ModelType.TRANSFORMER if transformer else None
    return nncf.quantize(model, dataset, model_type=kind,
                         subset_size=sum(len(rows_of(b)) for b in calibration))


def onnx_embed(file: Path, threads: int) -> Embed:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # ONNX Runtime's pool spins after each run by default, which takes a core from the next
    # interleaved row (measured: torch fp32 right after it, 2 threads, 305-335 ms spinning and
    # 272-281 ms not; ONNX Runtime's own 204-206 / 205-229 ms)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def embed(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = session.run(None, {n: batch[n].numpy() for n in names})[0]
        return answer(torch.from_numpy(out), batch)

    return embed


def peers(model: nn.Module, example: dict[str, torch.Tensor], calibration: list[Any],
          tmp: Path, threads: int) -> dict[str, Embed | str]:
    """Each peer's embed function, or why it failed (reported in the table)."""
    out: dict[str, Embed | str] = {}
    ir = tmp / "ir"
    sl.export(model, ir, format="openvino", example=example)
    makers: dict[str, Callable[[], Embed]] = {
        "OpenVINO fp32": lambda: openvino_embed(ir / "model.xml", threads, "f32"),
        "OpenVINO bf16 hint": lambda: openvino_embed(ir / "model.xml", threads, "bf16"),
        "OpenVINO int8 (NNCF PTQ)": lambda: openvino_embed(
            ir / "model.xml", threads, "f32",
            model=nncf_int8(ir / "model.xml", calibration, "input_ids" in example)),
        "OpenVINO int8 + bf16 (NNCF PTQ)": lambda: openvino_embed(
            ir / "model.xml", threads, "bf16",
            model=nncf_int8(ir / "model.xml", calibration, "input_ids" in example)),
        "ONNX Runtime fp32": lambda: onnx_embed(onnx_file(model, example, tmp), threads),
        "ONNX Runtime dynamic int8": lambda: onnx_embed(
            ort_dynamic_int8(onnx_file(model, example, tmp)), threads),
        "torchao int8 dynamic + compile": lambda: torch_embed(torchao_int8_dynamic(model)),
    }
    for name, make in makers.items():
        try:
            out[name] = make()
        except Exception as exc:  # a peer's failure is a row that says so
            out[name] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"[:160]
    return out


def torchao_int8_dynamic(model: nn.Module) -> nn.Module:
    """torchao's W8A8 (int8 weights per channel, activations per token) + torch.compile."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    peer = copy.deepcopy(model)
    quantize_(peer, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(peer)


def onnx_file(model: nn.Module, example: dict[str, torch.Tensor], tmp: Path) -> Path:
    directory = tmp / "onnx"
    if not (directory / "model.onnx").exists():
        sl.export(model, directory, format="onnx", example=example)
    return directory / "model.onnx"


def ort_dynamic_int8(file: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = file.with_name("model-int8.onnx")
    if not out.exists():
        quantize_dynamic(str(file), str(out), weight_type=QuantType.QInt8)
    return out


def slimline_rows(model: nn.Module, calibration: list[Any], recipes: list[Path],
                  only: str | None = None) -> dict[str, Embed | str]:
    """The slimline rows (``only``: a comma list of words, keeping the rows holding one)."""
    out: dict[str, Embed | str] = {}
    named = {f"recipes/{p.name}": p for p in recipes}
    words = [w for w in (only or "").split(",") if w]
    for name, steps in {**SLIMLINE_ROWS, **named}.items():
        if words and not any(w in name for w in words):
            continue
        if isinstance(steps, list) and EAGER_ATTENTION in steps and not has_attention_switch(model):  # not a transformers model
            continue
        if isinstance(steps, list) and UNPAD in steps and not UnpadConfig().applies_to(model):
            continue  # not a BERT-like encoder
        try:
            recipe = sl.Recipe.from_file(steps) if isinstance(steps, Path) else {"steps": steps}
            out[name] = torch_embed(sl.compress(model, recipe, calibration=calibration).model)
        except Exception as exc:
            out[name] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"[:160]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma list: one table per count")
    parser.add_argument("--model", default="minilm", choices=sorted(BATCH_SIZE))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 32 sentences (minilm), 64 images, 1 × 256 tokens")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches for cosine")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--recipes", default=None,
                        help="named recipes from recipes/ (comma list, '' for none; default: "
                             "the encoder recipes for minilm)")
    parser.add_argument("--rows", default=None,
                        help="keep only the slimline rows holding one of these comma-separated "
                             "words (peers always run)")
    parser.add_argument("--sort-by-length", action="store_true",
                        help="batch the held-out sentences by length, longest first (as "
                             "sentence-transformers' encode does), and time all --batches of "
                             "them a run instead of the first")
    parser.add_argument("--section-suffix", default="", help="appended to the section name")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    # Every compiled row is the same transformers forward under another backend callable:
    # dynamo's default limit of 8 recompilations would run the later rows eager, silently.
    torch._dynamo.config.recompile_limit = 256
    built = load_builtin(args.model)
    model = built.model
    size = args.batch_size or BATCH_SIZE[args.model]
    data = [inputs(b) for b in built.batches("test", batch_size=size, limit=args.batches)]
    if args.sort_by_length:
        data = by_length(data, size)
    calibration = [inputs(b) for b in
                   built.batches("train", batch_size=size, limit=args.calib_batches)]
    names = args.recipes if args.recipes is not None else RECIPES.get(args.model, "")
    recipes = [ROOT / "recipes" / f"{n}.yaml" for n in names.split(",") if n]
    parts = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        with tempfile.TemporaryDirectory() as tmp:
            rows: dict[str, Embed | str] = {"torch fp32 eager": torch_embed(model)}
            rows.update(peers(model, data[0], calibration, Path(tmp), threads))
            rows.update(slimline_rows(model, calibration, recipes, args.rows))
            parts.append(measure(model, rows, data, threads, args))
    body = (conditions_line(int(args.threads.split(",")[-1]), batch_size=size,
                            input_shape="×".join(map(str, rows_of(data[0]).shape)),
                            runs=args.runs, warmup=args.warmup,
                            cosine_samples=sum(len(rows_of(b)) for b in data))
            + f". {versions()}. Quality: {QUALITY[args.model]}. {timed(data, args)}\n\n"
            + "\n\n".join(parts))
    print(body)
    if not args.no_write:
        section = "cpu-deploy" if args.model == "minilm" else f"cpu-deploy-{args.model}"
        section += args.section_suffix
        kind = isa_suffix()
        write_section(section + kind, f"CPU deployment: {args.model} against OpenVINO (+NNCF), "
                      f"ONNX Runtime and torchao{' (' + kind[1:].upper() + ' CPU)' if kind else ''}",
                      body)


def by_length(data: list[dict[str, torch.Tensor]], size: int) -> list[dict[str, torch.Tensor]]:
    """The sentences of ``data`` (right-padded token batches) re-batched ``size`` at a time by
    length, longest first, each batch padded to its own longest."""
    rows = [{k: v[i] for k, v in b.items()} for b in data for i in range(len(rows_of(b)))]
    # each input's own padding value (the tokenizer's pad id for input_ids), read off a padded
    # position
    fill = {k: next((int(r[k][r["attention_mask"] == 0][0]) for r in rows
                     if bool((r["attention_mask"] == 0).any())), 0) for k in rows[0]}
    rows.sort(key=lambda r: -int(r["attention_mask"].sum()))
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        length = max(int(r["attention_mask"].sum()) for r in chunk)
        out.append({k: torch.stack([torch.nn.functional.pad(
            r[k][:length], (0, max(0, length - len(r[k]))), value=fill[k]) for r in chunk])
            for k in chunk[0]})
    return out


def timed(data: list[dict[str, torch.Tensor]], args: argparse.Namespace) -> str:
    """What one timed run computes, and how much of it is padding."""
    batches = data if args.sort_by_length else data[:1]
    masks = [b["attention_mask"] for b in batches if "attention_mask" in b]
    what = (f"Timed: all {len(batches)} batches a run, sorted by length"
            if args.sort_by_length else "Timed: the first batch")
    if not masks:
        return what + "."
    real, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    return (f"{what}; {real} of its {total} positions are real tokens ({real / total:.0%}), "
            "the rest padding.")


def rows_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's first input (its rows are the samples)."""
    return next(iter(batch.values()))


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A test batch as a deployed model gets it: its inputs, without labels."""
    return {k: v for k, v in batch.items() if k != "labels"}


def measure(model: nn.Module, rows: dict[str, Embed | str], data: list[Any], threads: int,
            args: argparse.Namespace) -> str:
    reference = [torch_embed(model)(b) for b in data]
    cosines: dict[str, float] = {}
    live: dict[str, Embed] = {}
    for name, embed in rows.items():
        if isinstance(embed, str):
            continue
        try:
            outs = [embed(b) for b in data]  # warms up (exports, compiles) on every shape
        except Exception as exc:
            rows[name] = f"failed: {type(exc).__name__}: {' '.join(str(exc).split())}"[:160]
            continue
        cos = [torch.nn.functional.cosine_similarity(o, r, dim=-1)
               for o, r in zip(outs, reference, strict=True)]
        cosines[name], live[name] = float(torch.cat(cos).mean()), embed
    batches = data if args.sort_by_length else data[:1]
    timings = interleaved({n: (lambda e=e: [e(b) for b in batches]) for n, e in live.items()},
                          runs=args.runs, warmup=args.warmup)
    base = timings["torch fp32 eager"].median_ms
    header = ["variant", "latency ms (median)", "p95 ms", "× torch fp32 speed", "cosine"]
    table = []
    for name, embed in rows.items():
        if name not in timings:
            table.append([name, "-", "-", "-", str(embed)])
            continue
        t = timings[name]
        table.append([name, f"{t.median_ms:.1f}", f"{t.p95_ms:.1f}",
                      f"{base / t.median_ms:.2f}", f"{cosines[name]:.5f}"])
    print_table(f"{args.model}, {threads} thread(s)", header, table)
    return f"**{threads} thread(s)**\n\n" + markdown_table(header, table)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("openvino", "nncf", "onnxruntime", "torchao", "transformers"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


if __name__ == "__main__":
    main()
