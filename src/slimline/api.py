"""compress / save / load / evaluate / export / list_methods: orchestration only."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from slimline.core import checkpoint
from slimline.core.batches import Batch, materialize
from slimline.core.config import MethodConfig
from slimline.core.recipe import Recipe
from slimline.core.registry import StepContext, handler_for, registered

if TYPE_CHECKING:
    from slimline.export.report import ExportReport


@dataclass
class StepReport:
    """What one step did: its method, the modules it changed, time taken, notes."""

    method: str
    modules: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "modules": self.modules,
            "seconds": self.seconds,
            "notes": self.notes,
        }


@dataclass
class CompressResult:
    """The compressed model (same call signature as the input) and one report per step."""

    model: nn.Module
    steps: list[StepReport]
    recipe: Recipe


def compress(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | Sequence[MethodConfig] | Sequence[dict[str, Any]],
    *,
    calibration: Iterable[object] | None = None,
    training: Iterable[object] | None = None,
    inplace: bool = False,
    progress: bool = False,
) -> CompressResult:
    """Apply ``recipe`` to ``model``; the input model is copied unless ``inplace=True``.
    ``recipe``: a :class:`Recipe`, a recipe file's dict, its list of steps (dicts), or configs.

    Everything that can be checked is checked before the model is touched: the recipe
    (fields, order), calibration data when a step needs it (and NaN/inf in it), NaN/inf in
    the weights, and that every step's targets select layers it can handle. ``training`` feeds
    the training steps (distill, lora, qat); it defaults to ``calibration``.
    """
    recipe = _as_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress: model must be an nn.Module, got {type(model).__name__}")
    batches = _calibration(recipe, calibration)
    train_batches = _training(recipe, training, batches)
    check_finite_weights(model)
    for i, step in enumerate(recipe.steps):
        _dry_run_targets(model, step, i)
    work = model if inplace else copy.deepcopy(model)
    ctx = StepContext(calibration=batches, training=train_batches, progress=progress,
                      original=_original(model, recipe, inplace))  # fmt: skip
    reports, recorded = [], []
    for step in recipe.steps:
        start = time.perf_counter()
        outcome = handler_for(step)(work, step, ctx)
        reports.append(
            StepReport(step.method, outcome.modules, time.perf_counter() - start, outcome.notes)
        )
        recorded.append((outcome.recorded or step).to_dict())
    previous = checkpoint.applied_recipe(work)["steps"]
    applied = {"version": 1, "steps": previous + recorded}
    setattr(work, checkpoint.RECIPE_ATTR, applied)
    checkpoint.record_reports(work, [r.to_dict() for r in reports])
    checkpoint.bind_save_pretrained(work)
    return CompressResult(model=work, steps=reports, recipe=recipe)


def _original(model: nn.Module, recipe: Recipe, inplace: bool) -> nn.Module | None:
    """The pre-recipe model for steps that need it (a teacher): the untouched input itself,
    or a frozen copy of it when the steps work in place."""
    if not any(step.needs_original() for step in recipe.steps):
        return None
    if not inplace:
        return model
    original = copy.deepcopy(model)
    original.requires_grad_(False)
    return original


def _as_recipe(
    recipe: Recipe | dict[str, Any] | Sequence[MethodConfig] | Sequence[dict[str, Any]],
) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (list, tuple)):
        if recipe and all(isinstance(step, dict) for step in recipe):
            return Recipe.from_dict({"steps": list(recipe)})  # the steps of a recipe file
        return Recipe(tuple(recipe))
    kind = type(recipe).__name__
    raise TypeError(f"recipe must be a Recipe, a dict or a list of configs, got {kind}")


def _calibration(recipe: Recipe, calibration: Iterable[object] | None) -> list[Batch] | None:
    if calibration is None:
        needing = [s.method for s in recipe.steps if s.requires_calibration()]
        if needing:
            raise ValueError(
                f"step {needing[0]!r} needs calibration data: pass calibration=batches"
            )
        return None
    batches = materialize(calibration)
    if not batches and recipe.needs_calibration:
        raise ValueError("calibration data is empty")
    return batches


def _training(
    recipe: Recipe, training: Iterable[object] | None, calibration: list[Batch] | None
) -> list[Batch] | None:
    needing = [s.method for s in recipe.steps if s.needs_training]
    if training is None:
        if needing and calibration is None:
            raise ValueError(f"step {needing[0]!r} needs training data: pass training=batches "
                             "(or calibration=batches, its default)")
        return calibration
    batches = materialize(training, where="training")
    if not batches and needing:
        raise ValueError(f"training data is empty (step {needing[0]!r} trains on it)")
    return batches


_FINITE_SLICE = 1 << 22


def check_finite_weights(model: nn.Module) -> None:
    """Raise ValueError naming the first parameter or buffer holding NaN or inf."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point():
            continue
        # In slices: ``isfinite`` makes a float temporary as large as its input (|t|), which
        # for a 32000 x 2048 embedding is 250 MiB.
        for part in t.detach().reshape(-1).split(_FINITE_SLICE):
            if not bool(torch.isfinite(part).all()):
                raise ValueError(f"model weight {name!r} contains NaN or inf values")


def _dry_run_targets(model: nn.Module, step: MethodConfig, index: int) -> None:
    step.select_modules(model, step=f"recipe step {index} ({step.method})")


def save(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any | None = None,
    source: str | None = None,
    source_dir: str | Path | None = None,
) -> Path:
    """Write ``model`` (compressed or not) to a directory: safetensors + JSON, atomically.

    ``source_dir``: the local Hugging Face directory the model came from, whose tokenizer,
    generation and sentence-transformers files and card are carried over (not its weights).
    """
    return checkpoint.save(model, path, tokenizer=tokenizer, source=source, source_dir=source_dir)


def load(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save` (``model``: skeleton for user classes)."""
    return checkpoint.load(path, model=model)


def list_methods() -> list[dict[str, Any]]:
    """One row per registered method: name, family, needs, devices, summary, paper."""
    return [
        {
            "method": c.method,
            "family": c.family.label,
            "calibration": c.needs_calibration,
            "training": c.needs_training,
            "devices": list(c.devices),
            "summary": c.summary,
            "paper": c.paper,
            "fields": [f for f in c.field_names() if f != "targets"],
        }
        for c in registered()
    ]


def evaluate(
    model: nn.Module,
    data: Iterable[object],
    metrics: Sequence[str] | None = None,
    baseline: nn.Module | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Measure ``model`` (and ``baseline`` side by side): see ``slimline.evaluate``."""
    from slimline.evaluate import evaluate as _evaluate

    batches = materialize(data, where="data")
    report: dict[str, Any] = _evaluate(
        model, batches, metrics=metrics, baseline=baseline, **options
    )
    return report


def export(
    model: nn.Module,
    path: str | Path,
    format: Literal["onnx", "openvino", "gguf"] = "onnx",
    example: object = None,
    **options: Any,
) -> ExportReport:
    """Write ``model`` to the directory ``path`` in a deployment ``format``, checked for parity
    with the torch model on ``example`` (one batch): see ``slimline.export.onnx``,
    ``slimline.export.openvino`` and ``slimline.export.gguf``."""
    if format not in ("onnx", "openvino", "gguf"):
        raise ValueError(f"export: format {format!r} is not supported yet "
                         "(supported: onnx, openvino, gguf)")
    if example is None:
        raise ValueError("export: pass example=batch (one batch of the model's inputs)")
    from slimline.compile.unpad import switched_off

    with switched_off(model):  # an exported graph holds the padded model (see unpad)
        if format == "openvino":
            from slimline.export.openvino import export_openvino

            return export_openvino(model, path, example, **options)
        if format == "gguf":
            from slimline.export.gguf import export_gguf

            return export_gguf(model, path, example, **options)
        from slimline.export.onnx import export_onnx

        return export_onnx(model, path, example, **options)
