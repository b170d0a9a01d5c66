"""``lora``: low-rank adapters trained on the task loss (LoRA arXiv 2106.09685, DoRA 2402.09353).

The step wraps each selected Linear-like layer in a :class:`~slimline.peft.layer.LoraLinear`,
freezes every other parameter and trains the adapters with :mod:`slimline.train`'s loop on the
model's own loss: batches that carry ``labels`` use them (:func:`~slimline.train.losses.task_loss`);
a Hugging Face causal LM without labels learns next-token prediction, ``labels = input_ids``
with padding masked out (-100). Any other model (a bare encoder such as ``BertModel``) has
no task loss, and the step refuses it before anything changes.

Over a quantized base (QLoRA, arXiv 2305.14314) the packed ``QuantLinear`` stays packed and
frozen and the adapters train in float32. ``merge: true`` folds the adapters into the base
weights; into a packed base it either keeps the adapter beside it (``merge_quantized:
keep``, exact) or re-quantizes ``dequant(W) + ΔW`` on the base's own grid
(``requantize``), whose added output error the step reports.

:func:`add_adapters` and :func:`merge_adapters` are public so that other training steps
(``distill``'s ``trainable: lora``) reuse them; ``slimline.peft.peft_format.save_adapter``
writes adapters as a directory the ``peft`` package loads.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from slimline.core.batches import (
    Batch,
    forward,
    materialize,
    output_tensor,
    to_device,
    with_positions,
)
from slimline.core.registry import StepContext, StepOutcome, register
from slimline.core.targets import is_linear_like, select, set_linear_weight
from slimline.peft.layer import LoraLinear
from slimline.quantize.packing import quantize_groups
from slimline.quantize.qlinear import QuantLinear
from slimline.train.config import TrainingConfig
from slimline.train.data import count_tokens, hold_out, rebatch
from slimline.train.loop import train_loop
from slimline.train.losses import task_loss
from slimline.train.recompute import check_checkpointing, gradient_checkpointing


@dataclass(frozen=True, kw_only=True)
class LoraConfig(TrainingConfig):
    """LoRA / DoRA adapters on the selected Linear-like layers, trained on the task loss.

    The loop's fields (accumulation, autocast, checkpointing, held-out evaluation, clipping,
    resumable checkpoints...) are :class:`~slimline.train.config.TrainingConfig`'s; the
    defaults below override its ``steps`` and ``lr``."""

    method: ClassVar[str] = "lora"
    summary: ClassVar[str] = "LoRA / DoRA / QLoRA adapters on the task loss, peft-compatible"
    paper: ClassVar[str] = ("LoRA arXiv 2106.09685; DoRA arXiv 2402.09353; "
                            "rsLoRA arXiv 2312.03732; QLoRA arXiv 2305.14314")  # fmt: skip

    # Rank of the update; 8 is peft's default, and the LoRA paper's Table 6 finds ranks as
    # low as 1–8 doing as well as 64 on GPT-3.
    r: int = 8
    # Scale numerator: the update is (alpha / r)·BA, so alpha = 2r keeps peft's usual 2× and
    # lets r change without retuning lr (LoRA §4.1).
    alpha: float = 16.0
    # Dropout on the adapter's input only (the base sees the undropped input), as in peft.
    dropout: float = 0.0
    # "dora" learns a per-row magnitude as well (arXiv 2402.09353).
    variant: Literal["lora", "dora"] = "lora"
    # Scale alpha / sqrt(r) instead of alpha / r (arXiv 2312.03732): stable at large r.
    rslora: bool = False
    # Fold the adapters into the base weights after training (a plain model again).
    merge: bool = False
    # With merge over a packed base: "keep" the adapter beside it (exact), or "requantize"
    # dequant(W) + ΔW on the base's grid (one layer again, with a reported rounding error).
    merge_quantized: Literal["keep", "requantize"] = "keep"
    # Optimizer steps, one batch each: a quick default (as qat's), enough to check a recipe;
    # real fine-tuning takes hundreds to thousands.
    steps: int = 16
    # Adam learning rate of the adapters; QLoRA uses 2e-4 (7B–13B), small models take more.
    lr: float = 1e-3
    # Seeds A's initialisation (and, as in every training step, the batch order and dropout).
    seed: int = 0

    def check(self) -> None:
        super().check()
        if self.r < 1:
            self.fail("r", f"must be ≥ 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0.0):
            self.fail("alpha", f"must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", f"must be in [0, 1), got {self.dropout}")

    def applies_to(self, model: nn.Module) -> bool:
        """False for Hugging Face models without a task head (``BertModel``, ``LlamaModel``):
        their forward takes no ``labels``, so there is no task loss to train the adapters on."""
        if not _is_huggingface(model):
            return True
        return "labels" in inspect.signature(model.forward).parameters

    def select_modules(self, model: nn.Module, *, step: str = "") -> list[tuple[str, nn.Module]]:
        """Linear-like or packed ``QuantLinear`` layers (default: all but the output head)."""
        name = step or self.method
        if not self.applies_to(model):
            raise ValueError(f"{name}: {type(model).__name__} has no task head (its forward "
                             "takes no labels), so there is no loss to train adapters on; "
                             "use a model with a head, e.g. *ForCausalLM")  # fmt: skip
        return adapter_targets(model, self, step=name)


def adapter_targets(
    model: nn.Module, cfg: LoraConfig, *, step: str = "lora"
) -> list[tuple[str, nn.Module]]:
    """The layers ``cfg.targets`` selects for adapters, on any model (no task head needed):
    Linear-like or packed ``QuantLinear`` layers, default all but the output head.
    ValueError (naming ``step``) for a glob that matches no layer or a layer already adapted."""
    chosen = select(model, cfg.targets, accepts=adaptable, what="Linear-like or QuantLinear",
                    step=step)  # fmt: skip
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for layer, _ in chosen:
        if layer.rpartition(".")[0] in wrapped:
            raise ValueError(f"{step}: {layer!r} already carries a LoRA adapter; merge it "
                             "first (merge: true) or exclude it in targets")  # fmt: skip
    return chosen


def adaptable(module: nn.Module) -> bool:
    """Whether LoRA can wrap ``module``: Linear-like, or a packed ``QuantLinear``."""
    return is_linear_like(module) or isinstance(module, QuantLinear)


def _is_huggingface(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "to_json_file")


# --- adapters ---------------------------------------------------------------------------------


def add_adapters(
    model: nn.Module,
    cfg: LoraConfig,
    modules: Sequence[tuple[str, nn.Module]] | None = None,
    *,
    freeze: bool = True,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, LoraLinear]:
    """Wrap layers of ``model`` in :class:`LoraLinear` adapters, in place; returns them by name.

    ``modules`` are the ``(name, layer)`` pairs to adapt (default: :func:`adapter_targets`,
    which raises a ValueError for a target that matches no layer; any model, a bare encoder
    included). Uses ``cfg.r``, ``alpha``, ``dropout``, ``variant``, ``rslora`` and ``seed``
    (A's initialisation); the training fields are the caller's. With ``freeze`` every
    parameter but the adapters' stops requiring gradients (as ``peft.get_peft_model``). The
    original layers become the adapters' ``base_layer``; :func:`remove_adapters` puts them
    back. ``masks`` gives layers by name a (N, K) weight mask (a pruned base keeps its zeros,
    :class:`LoraLinear`). Every adapter is built before the model changes, so an error leaves
    it as it was.
    """
    chosen = list(adapter_targets(model, cfg) if modules is None else modules)
    generator = torch.Generator().manual_seed(cfg.seed)
    masks = masks or {}
    adapters = {
        name: LoraLinear(module, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                         dora=cfg.variant == "dora", rslora=cfg.rslora, generator=generator,
                         weight_mask=masks.get(name))
        for name, module in chosen
    }  # fmt: skip
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, adapter in adapters.items():
        model.set_submodule(name, adapter)
    return adapters


def remove_adapters(model: nn.Module, adapters: Mapping[str, LoraLinear]) -> None:
    """Put each adapter's base layer back in its place (the adapters are dropped)."""
    for name, adapter in adapters.items():
        model.set_submodule(name, adapter.base_layer)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors of every :class:`LoraLinear` in ``model``: A, B (and m)."""
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            params += [module.lora_A.weight, module.lora_B.weight]
            if module.lora_magnitude_vector is not None:
                params.append(module.lora_magnitude_vector)
    return params


@dataclass
class MergeReport:
    """What :func:`merge_adapters` did: layers merged, kept beside a packed base, and the
    relative weight error ``‖Ŵ - W'‖_F / ‖W'‖_F`` each re-quantized layer took on."""

    merged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    requantized: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def merge_adapters(
    model: nn.Module,
    *,
    quantized: Literal["keep", "requantize"] = "keep",
    names: Collection[str] | None = None,
) -> MergeReport:
    """Fold every :class:`LoraLinear` of ``model`` into a plain layer, in place.

    A float base layer gets ``W' = W + ΔW`` (DoRA: each row rescaled to its magnitude)
    written into its own weight tensor, in its dtype, and takes the adapter's place: any
    reference to that weight (a sparsity mask, an optimizer) stays valid. A packed
    ``QuantLinear`` base is kept with its adapter (``"keep"``) or replaced by a new layer,
    ``dequant(W) + ΔW`` rounded onto the same grid (bits, groups, symmetry, scale dtype;
    ``"requantize"``). ``names``: only the adapters of these layers (default: all).
    """
    report = MergeReport()
    for name, adapter in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)
                          and (names is None or n in names)]:  # fmt: skip
        if not isinstance(adapter.base_layer, QuantLinear):
            set_linear_weight(adapter.base_layer, adapter.adapted_weight())
            model.set_submodule(name, adapter.base_layer)
            report.merged.append(name)
        elif quantized == "requantize":
            layer, report.requantized[name] = requantized_layer(adapter)
            model.set_submodule(name, layer)
            report.merged.append(name)
        else:
            report.kept.append(name)
    return report


def requantized_layer(adapter: LoraLinear) -> tuple[QuantLinear, float]:
    """``dequant(W) + ΔW`` rounded to nearest on the packed base's grid, and its relative
    Frobenius weight error against the exact adapted weight."""
    base = adapter.base_layer
    if not isinstance(base, QuantLinear):
        raise TypeError("requantized_layer needs a QuantLinear base")
    exact = adapter.adapted_weight()  # (N, K) float32
    q, scales, zeros = quantize_groups(exact, base.bits, base.group_size, base.symmetric,
                                       scale_dtype=base.scales.dtype)  # fmt: skip
    layer = QuantLinear.from_codes(q, scales, zeros, bias=base.bias, bits=base.bits,
                                   group_size=base.group_size, symmetric=base.symmetric,
                                   decode_activations=base.decode_activations)
    error = (layer.dequantized_weight() - exact).norm() / exact.norm().clamp_min(1e-12)
    return layer, float(error)


# --- training ---------------------------------------------------------------------------------


def check_training_batches(model: nn.Module, batches: Sequence[Batch] | None) -> list[Batch]:
    """The training batches, checked before anything changes: present, finite, and each with
    a loss: ``labels``, or ``input_ids`` for a Hugging Face causal LM."""
    if not batches:
        raise ValueError("lora needs training data: pass training=batches (or calibration)")
    checked = materialize(batches, where="lora training")  # NaN / inf named by batch
    causal = _is_causal_lm(model)
    for i, batch in enumerate(checked):
        has_labels = isinstance(batch, Mapping) and "labels" in batch
        if not has_labels and not (causal and isinstance(batch, Mapping) and "input_ids" in batch):
            raise ValueError(f"lora: training[{i}] has no 'labels' and the model is not a "
                             "Hugging Face causal LM (whose labels are its input_ids); "
                             "give dict batches with 'labels'")  # fmt: skip
    return checked


def _is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face causal LM: its class is one ``AutoModelForCausalLM`` builds."""
    if not _is_huggingface(model):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return type(model).__name__ in names


def causal_lm_labels(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) next-token labels: ``input_ids`` with padding (``attention_mask`` 0) at -100,
    which the model's loss ignores (it shifts the labels itself)."""
    labels = batch["input_ids"].clone()
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
        labels[mask == 0] = -100
    return labels


def lora_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The task loss of one checked batch: its ``labels``, else the causal-LM loss."""
    if isinstance(batch, Mapping) and "labels" not in batch:
        inputs = with_positions(model, batch)
        return model(**inputs, labels=causal_lm_labels(batch)).loss  # type: ignore[no-any-return]
    return task_loss(model, batch, field="lora")


def train_adapters(
    model: nn.Module,
    batches: Sequence[Batch],
    cfg: LoraConfig,
    *,
    progress: bool = False,
    held: Sequence[Batch] = (),
) -> list[float]:
    """Train the adapter parameters of ``model`` on the task loss; returns the step losses.

    The loop runs with ``cfg``'s options (accumulation, autocast, clipping, resumable
    checkpoints, ``cfg.checkpointing``); ``held`` batches, when given, are evaluated (in eval
    mode) for the best adapters and early stopping. Dropout (the adapters' and the model's
    own) is reseeded each step from ``cfg.seed`` by the loop, so a run repeats exactly and
    the caller's random state is untouched.
    """
    groups = [{"params": adapter_parameters(model), "lr": cfg.lr}]

    def evaluate() -> float:
        was_training = model.training
        model.eval()
        try:
            return sum(float(lora_loss(model, b)) for b in held) / len(held)
        finally:
            model.train(was_training)

    with gradient_checkpointing(model, cfg.checkpointing, field="lora.checkpointing"):
        return train_loop(groups, lambda i: lora_loss(model, batches[i]), len(batches),
                          steps=cfg.steps, seed=cfg.seed, name="lora", progress=progress,
                          options=cfg.loop_options(), evaluate=evaluate if held else None,
                          tokens=lambda i: count_tokens(batches[i]), model=model)  # fmt: skip


@register(LoraConfig)
def apply_lora(model: nn.Module, cfg: LoraConfig, ctx: StepContext) -> StepOutcome:
    """Add adapters, train them on the task loss, and merge them when ``cfg.merge``.

    Unmerged, the model is left as ``peft`` leaves it: only the adapters require gradients.
    Should training fail, every layer and ``requires_grad`` flag is as it was."""
    batches = check_training_batches(model, ctx.training)
    if cfg.batch_size is not None:
        batches = rebatch(batches, cfg.batch_size, field="lora.batch_size")
    chosen = cfg.select_modules(model)
    if not chosen:
        return StepOutcome(notes=["no layer selected: model unchanged"])
    check_checkpointing(model, cfg.checkpointing, field="lora.checkpointing")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    train, held = hold_out([to_device(b, device) for b in batches], cfg.eval_fraction)
    train = cfg.regroup(train)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    adapters: dict[str, LoraLinear] = {}
    try:
        adapters = add_adapters(model, cfg, chosen)
        model.train()  # adapter dropout on; the base weights are frozen either way
        with torch.enable_grad():
            losses = train_adapters(model, train, cfg, progress=ctx.progress, held=held)
    except BaseException:
        remove_adapters(model, adapters)  # the originals were never written to
        _restore_flags(flags)
        raise
    finally:
        model.train(was_training)
    notes = [f"{len(adapters)} layers, {cfg.variant} r={cfg.r} alpha={cfg.alpha:g}"
             f"{', rslora' if cfg.rslora else ''}: "
             f"{sum(p.numel() for p in adapter_parameters(model))} adapter parameters",
             f"{len(losses)} steps on {len(train)} batches, {len(held)} held out, task loss "
             f"{losses[0]:.4g} → {losses[-1]:.4g}", *cfg.ranks_note()]  # fmt: skip
    if cfg.merge:
        # A plain model again: its layers train as before. Merging goes layer by layer, each
        # merged layer computing what its adapter did, so a failure midway (out of memory)
        # leaves a model that still computes the trained function.
        _restore_flags(flags)
        notes += _merge_step(model, cfg, train[0])
    return StepOutcome(modules=[name for name, _ in chosen], notes=notes)


def _restore_flags(flags: dict[nn.Parameter, bool]) -> None:
    for p, flag in flags.items():
        p.requires_grad_(flag)


def _merge_step(model: nn.Module, cfg: LoraConfig, batch: Batch) -> list[str]:
    """Merge, and measure on ``batch`` the output error re-quantization adds (QLoRA)."""
    requantizing = cfg.merge_quantized == "requantize" and any(
        isinstance(m, LoraLinear) and isinstance(m.base_layer, QuantLinear)
        for m in model.modules()
    )
    before = _answer(model, batch) if requantizing else None
    report = merge_adapters(model, quantized=cfg.merge_quantized)
    notes = [f"merged {len(report.merged)} adapters into their base"]
    if report.kept:
        notes.append(f"{len(report.kept)} adapters kept beside their packed base")
    if before is not None:
        after = _answer(model, batch)
        error = float((after - before).norm() / before.norm().clamp_min(1e-12))
        worst = max(report.requantized.values())
        notes.append(f"{len(report.requantized)} packed layers re-quantized: relative weight "
                     f"error up to {worst:.3g}, relative output error {error:.3g} on "
                     "training[0]")  # fmt: skip
    return notes


@torch.no_grad()
def _answer(model: nn.Module, batch: Batch) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return output_tensor(forward(model, batch), batch).float()
    finally:
        model.train(was_training)
