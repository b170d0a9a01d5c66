"""``compile``: the last step of a recipe — TorchInductor, or a deployment runtime.

``backend: inductor`` (default) compiles the forward with ``torch.compile``; ``openvino`` and
``onnxruntime`` run it as a graph exported for that runtime, checked against the eager model
on the first batch (``compile/runtime.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from slimline.compile import encoder_attention
from slimline.compile.encoder_attention import has_attention_switch
from slimline.compile.runtime import install
from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register


@dataclass(frozen=True, kw_only=True)
class CompileConfig(MethodConfig):
    """Compile the model's forward with TorchInductor, OpenVINO or onnxruntime.

    The module is compiled in place (its call replaced, as ``nn.Module.compile`` does), so its
    class, parameters and ``state_dict`` keys stay those of the eager model and it saves like
    any other; the compilation itself cannot be stored and is redone by ``sl.load``.
    """

    method: ClassVar[str] = "compile"
    family: ClassVar[Family] = Family.COMPILE
    summary: ClassVar[str] = (
        "torch.compile (inductor), or the forward run by OpenVINO / onnxruntime; last step"
    )
    paper: ClassVar[str] = "PyTorch 2, ASPLOS 2024 (doi:10.1145/3620665.3640366)"
    reapply_on_load: ClassVar[bool] = True

    # inductor: kernel fusion in torch; openvino / onnxruntime: the model exported (parity
    # checked on its first batch) and run by that runtime, on the CPU.
    backend: Literal["inductor", "openvino", "onnxruntime"] = "inductor"
    # "max-autotune" benchmarks kernels at compile time: minutes on CPU, so not the default.
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    # None lets dynamo decide; True avoids recompiling for every new sequence length.
    dynamic: bool | None = None
    fullgraph: bool = False
    # Inductor's freezing: weights folded into the graph as constants (oneDNN prepacks them),
    # for inference under no_grad only; a weight changed after the first call is not seen.
    # Measured on minilm, 2 threads, AVX2: within timing noise of the default (BENCHMARKS
    # cpu-deploy), so off by default.
    freezing: bool = False
    # backend openvino: the precision OpenVINO computes in. "bf16" runs on CPUs with bf16
    # units (AVX512-BF16, AMX) and is checked on each first batch against the eager model
    # (cosine >= 0.999, else refused); CPUs without them compute in float32. Measured on
    # minilm (AMX, 1 thread): 3.8x torch fp32 eager at cosine 0.99999 (BENCHMARKS cpu-deploy).
    precision: Literal["f32", "bf16"] = "f32"
    # A transformers model's attention. "model" keeps its own (usually torch's
    # scaled_dot_product_attention, "sdpa"). "eager" switches it to transformers' matmul +
    # softmax, which inductor fuses with what surrounds it; faster on short inputs only (minilm,
    # 2 threads, AVX-512 VNNI, x torch fp32 eager: 32 sentences x 46 tokens, int8_dynamic +
    # compile 2.31x -> 2.82x; 4 x 256 tokens, 1.76x -> 1.08x). "slimline" runs an encoder's
    # self-attention on slimline's C kernel over each row's real keys only
    # (compile/encoder_attention.py; the same answers as "sdpa", padded positions included);
    # "auto" (the default) picks "slimline" for the encoders it is written for, under backend
    # inductor, where the kernel builds, and "model" for everything else. minilm structured 50%
    # + distill, int8_dynamic + compile, 32 x 46 tokens, 2 threads, AVX-512 VNNI, x torch fp32
    # eager in one run: model 3.86x, eager 4.35x, slimline 4.59x (BENCHMARKS
    # recovery-minilm-structured-slimline-attention-avx512).
    attention: Literal["auto", "model", "eager", "slimline"] = "auto"

    def check(self) -> None:
        if self.targets.include or self.targets.exclude:
            self.fail("targets", "compile applies to the whole model; remove targets")
        if self.precision != "f32" and self.backend != "openvino":
            self.fail("precision", f"only applies to backend openvino, not {self.backend}")
        if self.attention == "slimline" and self.backend != "inductor":
            self.fail("attention", f"'slimline' is a kernel torch.compile calls; backend "
                      f"{self.backend} exports the model's own attention")
        if self.backend == "inductor":
            if self.freezing and self.mode != "default":
                self.fail("freezing", f"torch.compile takes inductor options or a mode, not "
                          f"both: use mode default with freezing, not {self.mode}")
            return
        if self.freezing:
            self.fail("freezing", f"only applies to backend inductor, not {self.backend}")
        # An exported graph is one whole graph with dynamic batch and sequence axes.
        if self.mode != "default":
            self.fail("mode", f"only applies to backend inductor, not {self.backend}")
        if self.dynamic is False:
            self.fail("dynamic", f"backend {self.backend} always exports dynamic batch and "
                      "sequence axes")

    def applies_to(self, model: nn.Module) -> bool:
        if self.attention == "slimline":
            return bool(encoder_attention.encoders(model))
        return self.attention in ("auto", "model") or has_attention_switch(model)

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Nothing by name (the whole model); refuses ``attention`` on a model without one."""
        if self.attention == "slimline":
            if not encoder_attention.encoders(model):
                self.fail("attention", "'slimline' cannot run this model: "
                          f"{encoder_attention.why_not(model)}; leave attention at 'auto'")
        elif not self.applies_to(model):
            self.fail("attention", f"{self.attention!r} applies to a transformers model "
                      f"(set_attn_implementation); {type(model).__name__} has none, so leave "
                      "attention at 'auto'")
        return []

    def slimline_targets(self, model: nn.Module) -> list[nn.Module]:
        """The models whose attention this step switches to slimline's kernel: with
        ``attention: slimline`` every one :func:`encoder_attention.encoders` finds; with
        ``auto``, under backend inductor, those still on torch's ``sdpa`` (a user's own
        choice is kept)."""
        if self.attention == "slimline":
            return encoder_attention.encoders(model)
        if self.attention != "auto" or self.backend != "inductor":
            return []
        return [m for m in encoder_attention.encoders(model)
                if getattr(getattr(m, "config", None), "_attn_implementation", None) == "sdpa"]


@register(CompileConfig)
def apply_compile(model: nn.Module, cfg: CompileConfig, ctx: StepContext) -> StepOutcome:
    notes = []
    cfg.select_modules(model)  # refuses an attention the model cannot take
    targets = cfg.slimline_targets(model)
    for target in targets:
        encoder_attention.install(target)
    if targets:
        notes.append("attention: slimline (C kernel over each row's real keys)")
    elif cfg.attention == "eager":
        model.set_attn_implementation("eager")  # type: ignore[operator]
        notes.append("attention: eager")
    if cfg.backend != "inductor":
        install(model, cfg.backend, cfg.precision)  # refuses what the runtime cannot run
        computes = " in bf16 where the CPU has bf16 units" if cfg.precision == "bf16" else ""
        return StepOutcome(modules=[""], notes=[
            f"run by {cfg.backend}{computes}: exported on the first batch of each input "
            "signature, checked against the eager model", *notes])
    # torch.compile takes a mode or inductor options (check() refuses both).
    mode, options = (None, {"freezing": True}) if cfg.freezing else (cfg.mode, None)
    model.compile(backend="inductor", mode=mode, options=options, dynamic=cfg.dynamic,
                  fullgraph=cfg.fullgraph)
    return StepOutcome(modules=[""],
                       notes=["compiled lazily: the first forward pays for it", *notes])
