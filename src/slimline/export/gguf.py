"""Export a Hugging Face Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2 or GPT-2 to GGUF,
llama.cpp's file format, with its tokenizer.

The file is written with the ``gguf`` package (llama.cpp's own Python writer): the metadata of
llama.cpp's ``llama``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma``, ``gemma2`` or ``gpt2``
architecture, the tokenizer (``export/gguf_vocab.py``), and the tensors under llama.cpp's names,
q and k rows in llama.cpp's rotary order, Llama 3's rotary frequency factors as ``rope_freqs``,
Gemma's norm gains as llama.cpp applies them (``export/gguf_layout.py``).
A head tied to the embedding is not written twice (llama.cpp reads ``token_embd`` for it).

``dtype``: ``f32``, ``f16``, ``q8_0``, ``q4_0`` or ``q4_1`` (llama.cpp's blocks of 32 weights
sharing an f16 scale: 8-bit codes, 4-bit codes centred on 8, or 4-bit codes from an f16
minimum). Norm weights stay f32, as llama.cpp keeps them; a matrix whose rows are not whole
blocks is written f16, and under q4_0 / q4_1 the embedding and output matrices are q8_0
(llama.cpp's quantize also gives ``output`` more bits).

A slimline ``QuantLinear`` whose grid *is* the block's (groups of 32, f16 scales; symmetric 8
bits for q8_0 or 4 for q4_0, 4 bits of either kind for q4_1: rtn, gptq, awq or hqq weights) is
written code for code (under q4_1 the zero point becomes the block's minimum ``-scale·zero``,
rounded to f16: at most 2^-11 of it); any other is dequantized and re-encoded in ``dtype``
(rounding again), and ``export.json`` names which layers were which.

Parity without llama.cpp: the written file is read back with ``gguf.GGUFReader``, a model is
built from *its* metadata and dequantized tensors (the permutation undone), and its logits are
compared with the torch model's on the example batches of ``export/parity.py``. This checks
the metadata, names, layout and quantization the file holds; that llama.cpp itself loads it
and agrees is checked with llama.cpp (not a dependency of slimline).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import numpy as np
import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.export.gguf_layout import (
    ARCHITECTURES,
    BLOCK,
    ROPE_FREQS,
    ROPE_LONG,
    ROPE_SHORT,
    Architecture,
    LongRope,
    expected_shapes,
    gemma2_query_scalar,
    gguf_name,
    head_counts,
    import_gguf,
    llama3_rope_factors,
    longrope_of,
    rope_heads,
    rope_permute,
)
from slimline.export.gguf_read import read_gguf
from slimline.export.gguf_vocab import Vocab, build_vocab, source_tokenizer, tokenizer_json
from slimline.export.graph import (
    GraphForward,
    check_example,
    companions,
    describe_source,
    eval_mode,
    references,
    write_atomically,
)
from slimline.export.parity import STRICT, ParityCheck, Tolerance, compare_batch, parity_examples
from slimline.export.report import ExportReport

if TYPE_CHECKING:
    from slimline.quantize.qlinear import QuantLinear

GgufDtype = Literal["f32", "f16", "q8_0", "q4_0", "q4_1"]
MODEL_FILE = "model.gguf"
# Default parity per dtype, against the float model. Measured on code-llama-tiny (small, logits
# up to 7.3), as max abs diff of the logits' scale / 1 - cosine: f32 0 / 0 (the same floats);
# f16 3e-4 / 6e-9; q8_0 8e-3 / 1.6e-6; q4_0 3.5e-2 / 3.3e-5. The defaults leave ~4x margin;
# the quantized ones measure the rounding the user asked for, not a fault. f16 on tiny random
# Llama/Mistral/Qwen models with larger weights (std 0.15, logits up to 5.1) measured up to
# 2.4e-3 / 1e-6, so its bound is 1e-2: a tensor in the wrong place or order shows in the cosine.
TOLERANCES: dict[str, Tolerance] = {
    "f32": STRICT,
    "f16": Tolerance(atol=1e-2, min_cosine=0.99999),
    "q8_0": Tolerance(atol=3e-2, min_cosine=0.9999),
    "q4_0": Tolerance(atol=0.15, min_cosine=0.999),
    "q4_1": Tolerance(atol=0.15, min_cosine=0.999),  # no coarser than q4_0
}


def export_gguf(
    model: nn.Module,
    path: str | Path,
    example: object,
    *,
    dtype: GgufDtype = "f16",
    tokenizer: Any | None = None,
    atol: float | None = None,
    min_cosine: float | None = None,
) -> ExportReport:
    """Write the Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2 or GPT-2 ``model`` to the
    directory ``path`` as ``model.gguf`` and check its parity on ``example`` (one token batch).
    ``tokenizer``: the model's fast tokenizer (default: the one saved in the directory the model
    came from). ``atol``, ``min_cosine``: the parity to meet (default: :data:`TOLERANCES` of
    ``dtype``). Raises ValueError before anything is written for what cannot be exported, and
    when the file fails parity."""
    if dtype not in TOLERANCES:
        raise ValueError(f"export: gguf dtype must be one of {', '.join(TOLERANCES)}, "
                         f"got {dtype!r}")
    gguf = import_gguf()
    batch = check_example(example)
    default = TOLERANCES[dtype]
    tol = Tolerance(default.atol if atol is None else atol,
                    default.min_cosine if min_cosine is None else min_cosine)
    layout = check_model(model)
    window = _unwritten_window(layout)
    if window is not None:  # llama.cpp attends past it: compare where the two agree
        batch = _within(batch, window)
    from slimline.core.checkpoint import SOURCE_DIR_ATTR

    source_dir = getattr(model, SOURCE_DIR_ATTR, None)
    # Without one given, the source's own: special ids and the BOS rule as it applies them.
    read = tokenizer if tokenizer is not None else source_tokenizer(source_dir)
    vocab = build_vocab(tokenizer_json(read, source_dir), layout.config.vocab_size, read)

    def write(directory: Path) -> ExportReport:
        details = _write_file(gguf, model, layout, vocab, directory / MODEL_FILE, dtype)
        checks, graph = _parity(model, directory / MODEL_FILE, batch, tol)
        if not all(c.passed for c in checks):
            raise ValueError("export: the GGUF file read back differs from the model: " + "; ".join(
                f"max abs diff {c.max_abs_diff:.3g}, cosine {c.cosine:.6f} on {tuple(c.shape)}"
                for c in checks) + f" (tolerance {tol.to_dict()})")
        # The tokenizer beside the file, for ``slimline eval``; llama.cpp reads the GGUF alone.
        beside = companions(model, directory, tokenizer, config=False)
        report = ExportReport(Path(path), "gguf", f"gguf {metadata.version('gguf')}",
                              graph.input_names, [graph.output_name], {}, checks, False,
                              [MODEL_FILE, *beside], tolerance=tol, details=details)
        describe_source(report, model)
        report.write(directory)
        return report

    with eval_mode(model):
        return write_atomically(path, write)


@dataclass(frozen=True)
class Layout:
    """What :func:`check_model` found: the config, the architecture it is written as, whether
    the head is the embedding, and the rotary scaling (``linear`` factor, Llama 3's
    per-frequency divisors, or LongRoPE's factors)."""

    config: Any
    arch: Architecture
    tied: bool
    linear_factor: float | None
    rope_divisors: torch.Tensor | None
    rope_dims: int  # dimensions of each head the rotation turns (Phi-4-mini: 3/4 of them)
    longrope: LongRope | None = None


def check_model(model: nn.Module) -> Layout:
    """How ``model`` is written; ValueError naming what the architecture (as written here)
    cannot hold: another family, biases it has not, rope scaling, a sliding window, a layer
    slimline cannot write, a shape that differs from the config's (a pruned model)."""
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(str(model_type))
    if arch is None:
        raise ValueError(f"export: gguf writes Hugging Face {', '.join(ARCHITECTURES)} models; "
                         f"this model's type is {model_type or type(model).__name__!r}")
    activation = next((a for a in ("hidden_activation", "activation_function")
                       if hasattr(config, a)), "hidden_act")
    checks: tuple[tuple[str, object], ...] = ((activation, arch.activation), ("mlp_bias", False),
                                              ("use_sliding_window", False),
                                              ("scale_attn_weights", True),
                                              ("scale_attn_by_inverse_layer_idx", False))
    if not arch.qkv_bias:
        checks += (("attention_bias", False),)
    if arch.softcap:  # the query scale and the windows llama.cpp's gemma2 assumes
        checks += (("query_pre_attn_scalar", gemma2_query_scalar(
            config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            head_counts(config)[2])), ("layer_types", _alternating(config.num_hidden_layers)))
    for field, allowed in checks:
        if getattr(config, field, allowed) != allowed:
            raise ValueError(f"export: gguf cannot write config.{field}="
                             f"{getattr(config, field)!r} ({arch.name} needs {allowed!r})")
    if arch.softcap and None in (config.attn_logit_softcapping, config.final_logit_softcapping,
                                 config.sliding_window):
        raise ValueError("export: gguf's gemma2 needs both soft-caps and the sliding window")
    tied = _tied(model)
    if arch.norm_offset and not tied:
        raise ValueError(f"export: llama.cpp's {arch.name} uses the embedding as the output "
                         "head; this model's head is another tensor (untied, or quantized on its "
                         "own): keep it tied to write it")
    linear, divisors, longrope = _rope_scaling(config)
    if longrope is not None and arch.name != "phi3":
        raise ValueError(f"export: llama.cpp reads LongRoPE factors for phi3 models only, not "
                         f"{arch.name}")
    if divisors is not None and arch.name != "llama":
        raise ValueError(f"export: llama.cpp reads Llama 3's rope scaling for llama models "
                         f"only, not {arch.name}")
    d = head_counts(config)[2]
    rope_dims = int(d * float(_rope(config).get("partial_rotary_factor", 1.0)))
    if rope_dims != d and arch.pairs:
        raise ValueError(f"export: gguf cannot write a partial rotation ({rope_dims} of {d} "
                         f"dimensions) for {arch.name}")
    for key, shape in expected_shapes(config, arch, tied=tied).items():
        got = _tensor_shape(model, key, arch)
        if got != shape:
            raise ValueError(f"export: layer {key.rsplit('.', 1)[0]!r} has {key.rsplit('.')[-1]} "
                             f"shape {got}, the config says {shape}; gguf needs every block "
                             "shaped as the config")
    return Layout(config, arch, tied, linear, divisors, rope_dims, longrope)


def _rope_scaling(config: Any
                  ) -> tuple[float | None, torch.Tensor | None, LongRope | None]:
    """(linear factor, Llama 3 divisors, LongRoPE) of ``config``; at most one is set."""
    rope = _rope(config)
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return float(rope["factor"]), None, None
    if kind == "llama3":
        return None, llama3_rope_factors(
            head_counts(config)[2], float(rope.get("rope_theta", 10000.0)), float(rope["factor"]),
            float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
            int(rope["original_max_position_embeddings"])), None
    if kind == "longrope":
        return None, None, longrope_of(rope, int(config.max_position_embeddings))
    if kind != "default":
        raise ValueError(f"export: gguf writes rope scaling default, linear, llama3 and "
                         f"longrope; this model's is {kind!r}")
    return None, None, None


def _alternating(layers: int) -> list[str]:
    """Gemma 2's layer types, as llama.cpp's gemma2 assumes them: even layers slide."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _unwritten_window(layout: Layout) -> int | None:
    """The sliding window a Mistral or Phi-3 model attends within, which llama.cpp's ``llama``
    and ``phi3`` do not (they attend to every earlier token)."""
    window = getattr(layout.config, "sliding_window", None)
    return int(window) if layout.arch.name in ("llama", "phi3") and window else None


def _within(batch: Batch, window: int) -> Batch:
    """``batch``'s token tensors cut to their first ``window`` positions."""
    if isinstance(batch, torch.Tensor):
        return batch[:, :window] if batch.dim() == 2 else batch
    if not isinstance(batch, Mapping):
        return batch
    return {k: v[:, :window] if v.dim() == 2 else v for k, v in batch.items()}


def _tied(model: nn.Module) -> bool:
    """Whether the output head *is* the embedding (one tensor), so the file holds it once."""
    head = getattr(model, "lm_head", None)
    inputs = getattr(model, "get_input_embeddings", None)
    embed = inputs() if callable(inputs) else None
    return type(head) is nn.Linear and isinstance(embed, nn.Module) \
        and head.weight is getattr(embed, "weight", None)


# -- writing ---------------------------------------------------------------------------------

def _write_file(gguf: Any, model: nn.Module, layout: Layout, vocab: Vocab, file: Path,
                dtype: GgufDtype) -> dict[str, Any]:
    writer = gguf.GGUFWriter(str(file), layout.arch.name)
    _write_metadata(gguf, writer, layout, vocab, dtype)
    written: dict[str, list[str]] = {"exact_codes": [], "re_encoded": [], "f16_fallback": []}
    if layout.longrope is not None:  # llama.cpp picks long past the original context
        for name, factors in ((ROPE_LONG, layout.longrope.long),
                              (ROPE_SHORT, layout.longrope.short)):
            writer.add_tensor(name, factors.numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    if layout.rope_divisors is not None:
        writer.add_tensor(ROPE_FREQS, layout.rope_divisors.numpy(),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    for key in expected_shapes(layout.config, layout.arch, tied=layout.tied):
        array, qtype, how = _encode(gguf, model, key, layout, dtype)
        if how:
            written[how].append(key.rsplit(".", 1)[0])
        writer.add_tensor(gguf_name(key, layout.arch), array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes: dict[str, int | str] = {}
    window = _unwritten_window(layout)
    if window is not None:
        notes["sliding_window_not_written"] = window  # parity checked on that many tokens
    if vocab.caveat:
        notes["tokenizer_caveat"] = vocab.caveat
    if layout.longrope is not None:
        notes["longrope_factors"] = (
            f"llama.cpp takes the long factors whenever its context (n_ctx, which it rounds up "
            f"to a multiple of 256) is over {layout.longrope.original} tokens, transformers "
            f"only for sequences that long")
    return {"dtype": dtype, "architecture": layout.arch.name, "tokenizer": vocab.model,
            "tokenizer_pre": vocab.pre,
            "vocab": len(vocab.tokens), "merges": len(vocab.merges), "tied_output": layout.tied,
            **notes, **written}


def _write_metadata(gguf: Any, writer: Any, layout: Layout, vocab: Vocab, dtype: str) -> None:
    config = layout.config
    if layout.arch.gpt2:  # learned positions and LayerNorm: no rotary, no RMS epsilon
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(getattr(config, "n_inner", None) or 4 * config.hidden_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_layer_norm_eps(float(config.layer_norm_epsilon))
    else:
        _write_llama_metadata(gguf, writer, layout)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
                  "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_types[dtype])))
    _write_tokenizer(gguf, writer, vocab)


def _write_llama_metadata(gguf: Any, writer: Any, layout: Layout) -> None:
    """The hyperparameters of the Llama-like architectures (RMSNorm, rotary positions)."""
    config = layout.config
    heads, kv, d = head_counts(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(layout.rope_dims)
    if layout.arch.softcap:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    if layout.longrope is not None:
        writer.add_rope_scaling_orig_ctx_len(layout.longrope.original)
        writer.add_rope_scaling_attn_factors(layout.longrope.attn_factor)
    if layout.linear_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(layout.linear_factor)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _write_tokenizer(gguf: Any, writer: Any, vocab: Vocab) -> None:
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:  # "llama": merges by score, with a space prepended
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.space_prefix)
    else:
        writer.add_token_merges(vocab.merges)
    for ident, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.pad, writer.add_pad_token_id), (vocab.unk, writer.add_unk_token_id)):
        if ident is not None:
            add(ident)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def _encode(gguf: Any, model: nn.Module, key: str, layout: Layout, dtype: GgufDtype
            ) -> tuple[np.ndarray, Any, str | None]:
    """(array, GGML type, how) for one tensor; ``how`` names an exception to the plain float
    path: ``exact_codes``, ``re_encoded`` or ``f16_fallback``."""
    types = gguf.GGMLQuantizationType
    name, param = key.rsplit(".", 1)
    module = _module(model, name)
    heads = rope_heads(key, layout.config, layout.arch)
    if param == "bias":
        bias = _tensor(module, "bias").detach().float().cpu()
        return (rope_permute(bias, heads) if heads else bias).numpy(), types.F32, None
    blocks = {"q8_0": types.Q8_0, "q4_0": types.Q4_0, "q4_1": types.Q4_1}
    exact = _exact_blocks(module, dtype, heads)
    if exact is not None:
        return exact, blocks[dtype], "exact_codes"
    weight = _float_weight(module).detach().float().cpu()
    if heads:
        weight = rope_permute(weight, heads)
    if layout.arch.norm_offset and name.endswith("norm"):
        weight = weight + 1.0  # Gemma's 1 + w, as llama.cpp applies the gain
    how = "re_encoded" if _is_quant_linear(module) else None
    if weight.dim() == 1 or dtype == "f32":
        return weight.numpy(), types.F32, how
    if dtype == "f16" or weight.shape[-1] % BLOCK:
        fallback = "f16_fallback" if dtype != "f16" and how is None else how
        return weight.half().numpy(), types.F16, fallback
    # The embedding and output matrices stay 8-bit under 4 bits, as llama.cpp's own quantize
    # keeps ``output`` at a higher type (Q6_K): 4 bits there cost the most accuracy per byte.
    outer = name in ("model.embed_tokens", "lm_head", "transformer.wte", "transformer.wpe")
    qtype = types.Q8_0 if outer else blocks[dtype]
    return gguf.quants.quantize(weight.numpy(), qtype), qtype, how
def _exact_blocks(module: nn.Module, dtype: str, heads: int) -> np.ndarray | None:
    """A QuantLinear's codes as Q8_0/Q4_0/Q4_1 blocks, when its grid is the block's; else None.
    Block layout (ggml): an f16 scale, for Q4_1 an f16 minimum, then 32 int8 codes (Q8_0) or 16
    bytes holding codes 0..15 of weights j (low nibble) and j + 16 (high nibble) (Q4_0:
    w = d·(q - 8); Q4_1: w = d·q + m)."""
    # Q4_1 holds symmetric codes too: m = -8·s, exact in f16.
    bits, symmetric = {"q8_0": (8, True), "q4_0": (4, True), "q4_1": (4, None)}.get(
        dtype, (None, None))
    if not _is_quant_linear(module) or bits is None or getattr(module, "bits", None) != bits \
            or symmetric not in (None, module.symmetric) or module.group != BLOCK \
            or module.in_features % BLOCK or module.scales.dtype != torch.float16:
        return None
    codes = module.centred_codes() if bits == 8 else module.stored_codes()  # (N, K)
    scales = module.scales  # (N, K / 32)
    header = [scales]
    if dtype == "q4_1":  # w = s·(q - z) = s·q + m with m = -s·z, rounded to f16
        header.append((-scales.float() * module.zero_points().float()).half())
    if heads:
        codes = rope_permute(codes, heads)
        header = [rope_permute(h, heads) for h in header]
    n = codes.shape[0]
    d = np.concatenate([h.reshape(-1, 1).cpu().numpy().view(np.uint8) for h in header],
                       axis=1)  # (N·G, 2 or 4)
    q = codes.reshape(-1, BLOCK).cpu().numpy().view(np.uint8)  # (N·G, 32)
    if bits == 4:
        q = q[:, : BLOCK // 2] | (q[:, BLOCK // 2:] << np.uint8(4))  # (N·G, 16)
    return np.concatenate([d, q], axis=1).reshape(n, -1)


def _parity(model: nn.Module, file: Path, batch: Batch, tol: Tolerance
            ) -> tuple[list[ParityCheck], GraphForward]:
    rebuilt = read_gguf(file).model()
    graph = GraphForward(model, batch)
    examples, outputs = references(graph, parity_examples(batch))
    theirs = GraphForward(rebuilt, batch)
    checks = []
    with torch.no_grad():
        for example, reference in zip(examples, outputs, strict=True):
            checks.append(compare_batch(reference, theirs(*_tensors(example)), example, tol))
    return checks, graph


# -- helpers ---------------------------------------------------------------------------------

def _tensors(batch: Batch) -> tuple[torch.Tensor, ...]:
    from slimline.export.parity import batch_tensors

    return batch_tensors(batch)


def _rope(config: Any) -> dict[str, Any]:
    """The rope settings of a transformers 5 (``rope_parameters``) or 4 config."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    rope = dict(params) if isinstance(params, dict) else {}
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"export: gguf expects a layer {name!r}, which the model lacks") \
            from None


def _is_quant_linear(module: nn.Module) -> TypeGuard[QuantLinear]:
    # By name: importing qlinear here would load its kernels for a float export.
    return type(module).__name__ == "QuantLinear" and hasattr(module, "dequantized_weight")


def _tensor_shape(model: nn.Module, key: str, arch: Architecture) -> tuple[int, ...]:
    """The shape of ``key``'s tensor in ``model``; ValueError for a layer slimline cannot write
    or a bias the architecture has not."""
    name, param = key.rsplit(".", 1)
    module = _module(model, name)
    bias = getattr(module, "bias", None)
    if param == "bias":
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"export: layer {name!r} has no bias, which {arch.name}'s gguf needs")
        return tuple(bias.shape)
    if bias is not None and not arch.gpt2 and not (
            arch.qkv_bias and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")):
        raise ValueError(f"export: layer {name!r} has a bias, which {arch.name}'s gguf has not")
    if _is_quant_linear(module):
        return (int(module.out_features), int(module.in_features))
    from slimline.core.targets import is_conv1d

    if arch.gpt2 and (is_conv1d(module) or isinstance(module, nn.LayerNorm)):
        return tuple(_float_weight(module).shape)
    # Gemma's embedding scales by sqrt(hidden) in the module; llama.cpp's gemma does it itself.
    scaled = arch.norm_offset and isinstance(module, nn.Embedding)
    if type(module) not in (nn.Linear, nn.Embedding) and not scaled \
            and not name.endswith("norm") and not name.endswith("layernorm"):
        raise ValueError(f"export: layer {name!r} ({type(module).__name__}) cannot be written "
                         "to GGUF: only nn.Linear and slimline's rtn/gptq/awq QuantLinear are")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"export: layer {name!r} ({type(module).__name__}) has no weight")
    return tuple(weight.shape)


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight (GPT-2's Conv1D stores it (in, out))."""
    from slimline.core.targets import is_conv1d

    if _is_quant_linear(module):
        return module.dequantized_weight(torch.float32)
    if is_conv1d(module):
        return _tensor(module, "weight").t()
    return _tensor(module, "weight")


def _tensor(module: nn.Module, param: str) -> torch.Tensor:
    value = getattr(module, param, None)
    if not isinstance(value, torch.Tensor):  # check_model refuses such layers first
        raise TypeError(f"export: {type(module).__name__} has no {param} tensor")
    return value
