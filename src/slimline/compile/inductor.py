"""``compile``: ``torch.compile`` with the inductor backend, as the last step of a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from slimline.core.config import MethodConfig
from slimline.core.families import Family
from slimline.core.registry import StepContext, StepOutcome, register


@dataclass(frozen=True, kw_only=True)
class CompileConfig(MethodConfig):
    """Compile the model's forward with TorchInductor (kernel fusion, no Python overhead).

    The module is compiled in place (``nn.Module.compile``), so its class, parameters and
    ``state_dict`` keys stay those of the eager model and it saves like any other; the
    compilation itself cannot be stored and is redone by ``sl.load``.
    """

    method: ClassVar[str] = "compile"
    family: ClassVar[Family] = Family.COMPILE
    summary: ClassVar[str] = "torch.compile (inductor): fused kernels, last step of a recipe"
    paper: ClassVar[str] = "PyTorch 2, ASPLOS 2024 (doi:10.1145/3620665.3640366)"
    reapply_on_load: ClassVar[bool] = True

    # "max-autotune" benchmarks kernels at compile time: minutes on CPU, so not the default.
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    # None lets dynamo decide; True avoids recompiling for every new sequence length.
    dynamic: bool | None = None
    fullgraph: bool = False

    def check(self) -> None:
        if self.targets.include or self.targets.exclude:
            self.fail("targets", "compile applies to the whole model; remove targets")

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        return []


@register(CompileConfig)
def apply_compile(model: nn.Module, cfg: CompileConfig, ctx: StepContext) -> StepOutcome:
    model.compile(backend="inductor", mode=cfg.mode, dynamic=cfg.dynamic, fullgraph=cfg.fullgraph)
    return StepOutcome(modules=[""], notes=["compiled lazily: the first forward pays for it"])
