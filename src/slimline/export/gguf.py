"""Export a Hugging Face Llama to GGUF, llama.cpp's file format, with its tokenizer.

The file is written with the ``gguf`` package (llama.cpp's own Python writer): the ``llama``
architecture's metadata, the tokenizer (``export/gguf_vocab.py``), and the tensors under
llama.cpp's names, the q and k rows in llama.cpp's rotary order (``export/gguf_layout.py``).

``dtype``: ``f32``, ``f16``, ``q8_0`` or ``q4_0`` (llama.cpp's blocks of 32 weights sharing an
f16 scale: 8-bit codes, or 4-bit codes centred on 8). Norm weights stay f32, as llama.cpp keeps
them; a matrix whose rows are not whole blocks is written f16, and under q4_0 the embedding
and output matrices are q8_0 (llama.cpp's quantize also gives ``output`` more bits).

A slimline ``QuantLinear`` whose grid *is* the block's (symmetric, groups of 32, f16 scales,
8 bits for q8_0 or 4 for q4_0: rtn, gptq or awq weights) is written code for code, exactly;
any other is dequantized and re-encoded in ``dtype`` (rounding again), and ``export.json``
names which layers were which.

Parity without llama.cpp: the written file is read back with ``gguf.GGUFReader``, a Llama is
built from *its* metadata and dequantized tensors (the permutation undone), and its logits are
compared with the torch model's on the example batches of ``export/parity.py``. This checks
the metadata, names, layout and quantization the file holds; that llama.cpp itself loads it
and agrees is checked with llama.cpp (not a dependency of slimline).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

import numpy as np
import torch
from torch import nn

from slimline.core.batches import Batch
from slimline.export.gguf_layout import (
    BLOCK,
    expected_shapes,
    gguf_name,
    head_counts,
    rope_heads,
    rope_permute,
    rope_unpermute,
)
from slimline.export.gguf_vocab import Vocab, build_vocab, tokenizer_json
from slimline.export.graph import (
    GraphForward,
    check_example,
    describe_source,
    eval_mode,
    references,
    write_atomically,
)
from slimline.export.parity import STRICT, ParityCheck, Tolerance, compare_batch, parity_examples
from slimline.export.report import ExportReport

if TYPE_CHECKING:
    from slimline.quantize.qlinear import QuantLinear

GgufDtype = Literal["f32", "f16", "q8_0", "q4_0"]
MODEL_FILE = "model.gguf"
# llama.cpp's name for GPT-2's byte-level split (llama-vocab.cpp matches "gpt-2"; "gpt2" is
# its tokenizer *model* name, and as a pre-tokenizer it fails to load: "unknown pre-tokenizer").
PRE_TOKENIZER = "gpt-2"
# Default parity per dtype, against the float model. Measured on code-llama-tiny (small, logits
# up to 7.3), as max abs diff of the logits' scale / 1 - cosine: f32 0 / 0 (the same floats);
# f16 3e-4 / 6e-9; q8_0 8e-3 / 1.6e-6; q4_0 3.5e-2 / 3.3e-5. The defaults leave ~4x margin;
# the quantized ones measure the rounding the user asked for, not a fault.
TOLERANCES: dict[str, Tolerance] = {
    "f32": STRICT,
    "f16": Tolerance(atol=2e-3, min_cosine=0.99999),
    "q8_0": Tolerance(atol=3e-2, min_cosine=0.9999),
    "q4_0": Tolerance(atol=0.15, min_cosine=0.999),
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
    """Write the Llama ``model`` to the directory ``path`` as ``model.gguf`` and check its
    parity on ``example`` (one token batch). ``tokenizer``: the model's fast tokenizer (default:
    the ``tokenizer.json`` of the directory the model came from). ``atol``, ``min_cosine``:
    the parity to meet (default: :data:`TOLERANCES` of ``dtype``). Raises ValueError before
    anything is written for what cannot be exported, and when the file fails parity."""
    if dtype not in TOLERANCES:
        raise ValueError(f"export: gguf dtype must be one of {', '.join(TOLERANCES)}, "
                         f"got {dtype!r}")
    gguf = _import_gguf()
    batch = check_example(example)
    default = TOLERANCES[dtype]
    tol = Tolerance(default.atol if atol is None else atol,
                    default.min_cosine if min_cosine is None else min_cosine)
    config = check_llama(model)
    from slimline.core.checkpoint import SOURCE_DIR_ATTR

    vocab = build_vocab(tokenizer_json(tokenizer, getattr(model, SOURCE_DIR_ATTR, None)),
                        config.vocab_size, tokenizer)
    def write(directory: Path) -> ExportReport:
        details = _write_file(gguf, model, config, vocab, directory / MODEL_FILE, dtype)
        checks, graph = _parity(model, directory / MODEL_FILE, batch, tol)
        if not all(c.passed for c in checks):
            raise ValueError("export: the GGUF file read back differs from the model: " + "; ".join(
                f"max abs diff {c.max_abs_diff:.3g}, cosine {c.cosine:.6f} on {tuple(c.shape)}"
                for c in checks) + f" (tolerance {tol.to_dict()})")
        report = ExportReport(Path(path), "gguf", f"gguf {metadata.version('gguf')}",
                              graph.input_names, [graph.output_name], {}, checks, False,
                              [MODEL_FILE], tolerance=tol, details=details)
        describe_source(report, model)
        report.write(directory)
        return report

    with eval_mode(model):
        return write_atomically(path, write)


def check_llama(model: nn.Module) -> Any:
    """The model's config; ValueError naming what llama.cpp's ``llama`` architecture (as
    written here) cannot hold: another family, biases, rope scaling, a layer slimline cannot
    write, a shape that differs from the config's (a pruned model)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"export: gguf writes Hugging Face Llama models only; this model's "
                         f"type is {getattr(config, 'model_type', type(model).__name__)!r}")
    for field, allowed in (("hidden_act", "silu"), ("attention_bias", False),
                           ("mlp_bias", False)):
        if getattr(config, field, allowed) != allowed:
            raise ValueError(f"export: gguf cannot write config.{field}="
                             f"{getattr(config, field)!r} (llama needs {allowed!r})")
    rope = _rope(config)
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"export: gguf does not write rope scaling {rope.get('rope_type')!r} yet")
    for name, shape in expected_shapes(config).items():
        module = _module(model, name)
        got = _weight_shape(name, module)
        if got != shape:
            raise ValueError(f"export: layer {name!r} has weight shape {got}, the config says "
                             f"{shape}; gguf needs every block shaped as the config")
    return config


# -- writing ---------------------------------------------------------------------------------

def _write_file(gguf: Any, model: nn.Module, config: Any, vocab: Vocab, file: Path,
                dtype: GgufDtype) -> dict[str, Any]:
    writer = gguf.GGUFWriter(str(file), "llama")
    _write_metadata(gguf, writer, config, vocab, dtype)
    written: dict[str, list[str]] = {"exact_codes": [], "re_encoded": [], "f16_fallback": []}
    for name in expected_shapes(config):
        array, qtype, how = _encode(gguf, _module(model, name), name, config, dtype)
        if how:
            written[how].append(name)
        writer.add_tensor(gguf_name(name), array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"dtype": dtype, "architecture": "llama", "tokenizer_pre": PRE_TOKENIZER,
            "vocab": len(vocab.tokens), "merges": len(vocab.merges), **written}


def _write_metadata(gguf: Any, writer: Any, config: Any, vocab: Vocab, dtype: str) -> None:
    heads, kv, d = head_counts(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_rope_freq_base(float(_rope(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0",
                  "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(int(getattr(gguf.LlamaFileType, file_types[dtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for ident, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.pad, writer.add_pad_token_id)):
        if ident is not None:
            add(ident)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)


def _encode(gguf: Any, module: nn.Module, name: str, config: Any, dtype: GgufDtype
            ) -> tuple[np.ndarray, Any, str | None]:
    """(array, GGML type, how) for one module's weight; ``how`` names an exception to the
    plain float path: ``exact_codes``, ``re_encoded`` or ``f16_fallback``."""
    types = gguf.GGMLQuantizationType
    heads = rope_heads(name, config)
    exact = _exact_blocks(module, dtype, heads)
    if exact is not None:
        return exact, types.Q8_0 if dtype == "q8_0" else types.Q4_0, "exact_codes"
    weight = _float_weight(module).detach().float().cpu()
    if heads:
        weight = rope_permute(weight, heads)
    how = "re_encoded" if _is_quant_linear(module) else None
    if weight.dim() == 1 or dtype == "f32":
        return weight.numpy(), types.F32, how
    if dtype == "f16" or weight.shape[-1] % BLOCK:
        fallback = "f16_fallback" if dtype != "f16" and how is None else how
        return weight.half().numpy(), types.F16, fallback
    # The embedding and output matrices stay 8-bit under q4_0, as llama.cpp's own quantize
    # keeps ``output`` at a higher type (Q6_K): 4 bits there cost the most accuracy per byte.
    outer = name in ("model.embed_tokens", "lm_head")
    qtype = types.Q8_0 if dtype == "q8_0" or outer else types.Q4_0
    return gguf.quants.quantize(weight.numpy(), qtype), qtype, how


def _exact_blocks(module: nn.Module, dtype: str, heads: int) -> np.ndarray | None:
    """A QuantLinear's codes as Q8_0/Q4_0 blocks, when its grid is the block's; else None.
    Block layout (ggml): an f16 scale, then 32 int8 codes (Q8_0) or 16 bytes holding codes
    0..15 of weights j (low nibble) and j + 16 (high nibble) (Q4_0: w = d·(q - 8))."""
    bits = {"q8_0": 8, "q4_0": 4}.get(dtype)
    if not _is_quant_linear(module) or bits is None or getattr(module, "bits", None) != bits \
            or not module.symmetric or module.group != BLOCK or module.in_features % BLOCK \
            or module.scales.dtype != torch.float16:
        return None
    codes = module.centred_codes() if bits == 8 else module.stored_codes()  # (N, K)
    scales = module.scales  # (N, K / 32)
    if heads:
        codes, scales = rope_permute(codes, heads), rope_permute(scales, heads)
    n = codes.shape[0]
    d = scales.reshape(-1, 1).cpu().numpy().view(np.uint8)  # (N·G, 2)
    q = codes.reshape(-1, BLOCK).cpu().numpy().view(np.uint8)  # (N·G, 32)
    if bits == 4:
        q = q[:, : BLOCK // 2] | (q[:, BLOCK // 2:] << np.uint8(4))  # (N·G, 16)
    return np.concatenate([d, q], axis=1).reshape(n, -1)


# -- reading back ----------------------------------------------------------------------------

def read_gguf(file: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A LlamaForCausalLM config and HF state dict rebuilt from ``file``'s metadata and
    dequantized tensors, the rope permutation undone."""
    gguf = _import_gguf()
    from transformers import LlamaConfig

    reader = gguf.GGUFReader(str(file))

    def field(key: str) -> Any:
        return reader.fields[f"llama.{key}"].contents()

    heads, kv = int(field("attention.head_count")), int(field("attention.head_count_kv"))
    config = LlamaConfig(
        vocab_size=int(field("vocab_size")), hidden_size=int(field("embedding_length")),
        intermediate_size=int(field("feed_forward_length")),
        num_hidden_layers=int(field("block_count")), num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=int(field("attention.key_length")),
        max_position_embeddings=int(field("context_length")),
        rms_norm_eps=float(field("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(field("rope.freq_base"))},
        tie_word_embeddings=False,
    )
    stored = {t.name: t for t in reader.tensors}
    state = {}
    for name, shape in expected_shapes(config).items():
        t = stored[gguf_name(name)]
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type),
                                      dtype=np.float32)).reshape(shape)
        permuted = rope_heads(name, config)
        state[name + ".weight"] = rope_unpermute(w, permuted) if permuted else w
    return config, state


def _parity(model: nn.Module, file: Path, batch: Batch, tol: Tolerance
            ) -> tuple[list[ParityCheck], GraphForward]:
    from transformers import LlamaForCausalLM

    config, state = read_gguf(file)
    rebuilt = LlamaForCausalLM(config).eval()
    rebuilt.load_state_dict(state, strict=True)
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


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ImportError("GGUF export needs the gguf package: pip install 'slimline[gguf]'") \
            from None
    return gguf


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
        raise ValueError(f"export: gguf expects a Llama layer {name!r}, which the model lacks") \
            from None


def _is_quant_linear(module: nn.Module) -> TypeGuard[QuantLinear]:
    # By name: importing qlinear here would load its kernels for a float export.
    return type(module).__name__ == "QuantLinear" and hasattr(module, "dequantized_weight")


def _weight_shape(name: str, module: nn.Module) -> tuple[int, ...]:
    if _is_quant_linear(module):
        if getattr(module, "bias", None) is not None:
            raise ValueError(f"export: layer {name!r} has a bias, which llama's gguf has not")
        return (int(module.out_features), int(module.in_features))
    if type(module) not in (nn.Linear, nn.Embedding) and not name.endswith("norm") \
            and not name.endswith("layernorm"):
        raise ValueError(f"export: layer {name!r} ({type(module).__name__}) cannot be written "
                         "to GGUF: only nn.Linear and slimline's rtn/gptq/awq QuantLinear are")
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"export: layer {name!r} has a bias, which llama's gguf has not")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"export: layer {name!r} ({type(module).__name__}) has no weight")
    return tuple(weight.shape)


def _float_weight(module: nn.Module) -> torch.Tensor:
    if _is_quant_linear(module):
        return module.dequantized_weight(torch.float32)
    weight = module.weight
    if not isinstance(weight, torch.Tensor):  # check_llama refuses such layers first
        raise TypeError(f"export: {type(module).__name__} has no weight tensor")
    return weight
