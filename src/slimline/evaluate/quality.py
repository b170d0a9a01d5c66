"""The quality pass: run the models over the data once and accumulate quality metrics.

What a model's output *is* decides which metrics apply (:class:`OutputKind`):

- a **causal LM**: a dict batch with ``input_ids`` (B, T) and logits (B, T, V) with V above
  every token id — perplexity, KL and agreement per next-token distribution;
- **logits**: an output with a ``logits`` field, or a plain tensor (taken to be scores) —
  KL and top-1 agreement apply;
- anything else (e.g. an encoder's pooled ``last_hidden_state``) — cosine only.

Accuracy applies when batches carry ``labels`` shaped like the scores' leading dimensions
(for a causal LM, Hugging Face labels, shifted one token as the model's own loss does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimline.core.batches import Batch, forward, output_tensor, split_labels, to_device
from slimline.evaluate import metrics as M

QUALITY_METRICS = ("perplexity", "accuracy", "cosine", "kl", "agreement")
PAIRWISE_METRICS = ("cosine", "kl", "agreement")  # need a baseline

# Hugging Face heads whose (B, T, V) logits are not next-token predictions.
_NOT_CAUSAL = ("MaskedLM", "TokenClassification", "QuestionAnswering")


@dataclass(frozen=True)
class OutputKind:
    """What a model's output on a batch is, as far as metrics care."""

    causal_lm: bool
    logits: bool
    labels: bool


def detect_kind(model: nn.Module, batch: Batch, output: Any) -> OutputKind:
    """Classify ``output`` (the raw result of ``forward(model, batch)``)."""
    inputs, labels = split_labels(batch)
    scores = output_tensor(output, inputs)
    has_logits = isinstance(output, torch.Tensor) or _field(output, "logits") is not None
    causal = has_logits and _is_causal_lm(model, inputs, scores)
    return OutputKind(causal_lm=causal, logits=has_logits, labels=labels is not None)


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _is_causal_lm(model: nn.Module, inputs: Batch, scores: torch.Tensor) -> bool:
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        return False
    ids = inputs["input_ids"]
    if scores.dim() != 3 or scores.shape[:2] != ids.shape:
        return False
    if any(tag in type(model).__name__ for tag in _NOT_CAUSAL):
        return False
    return ids.numel() == 0 or scores.shape[-1] > int(ids.max())


def applicable_metrics(kind: OutputKind, *, has_baseline: bool) -> list[str]:
    """The quality metrics that make sense for ``kind``, in canonical order."""
    found = []
    if kind.causal_lm:
        found.append("perplexity")
    if kind.labels and kind.logits:
        found.append("accuracy")
    if has_baseline:
        found.append("cosine")
        if kind.logits:
            found += ["kl", "agreement"]
    return found


def why_not_applicable(metric: str, kind: OutputKind) -> str:
    """A sentence for the ValueError raised when ``metric`` was asked for but cannot apply."""
    reasons = {
        "perplexity": "needs a causal language model: a dict batch with input_ids and "
        "logits of shape (batch, tokens, vocabulary)",
        "accuracy": "needs batches with 'labels' and a model output of class scores (logits)",
        "kl": "needs logits (an output with a 'logits' field, or a plain tensor of scores)",
        "agreement": "needs logits (an output with a 'logits' field, or a plain tensor of "
        "scores)",
    }
    return f"metric {metric!r} does not apply to this model: {reasons.get(metric, '')}"


class QualityPass:
    """Accumulators for one pass over the data; ``add`` one batch, then ``results``."""

    def __init__(self, metrics: Sequence[str], kind: OutputKind, names: Sequence[str]) -> None:
        self.metrics = set(metrics)
        self.kind = kind
        self.means = {name: {m: M.Mean() for m in QUALITY_METRICS} for name in names}

    def add(self, batch: Batch, outputs: Mapping[str, torch.Tensor]) -> None:
        """Accumulate one batch's output tensors (keyed "baseline"/"model")."""
        inputs, labels = split_labels(batch)
        mask = _token_mask(inputs, outputs["model"])
        for name, scores in outputs.items():
            self._add_task_metrics(name, scores, inputs, labels)
        reference = outputs.get("baseline")
        if reference is None:
            return
        model_out, ref = outputs["model"], reference.to(outputs["model"].device)
        means = self.means["model"]
        if "cosine" in self.metrics:
            means["cosine"].add(M.cosine_sum(ref, model_out, mask))
        if "kl" in self.metrics:
            means["kl"].add(M.kl_sum(ref, model_out, mask))
        if "agreement" in self.metrics:
            means["agreement"].add(M.agreement_counts(ref, model_out, mask))

    def _add_task_metrics(
        self, name: str, scores: torch.Tensor, inputs: Batch, labels: torch.Tensor | None
    ) -> None:
        means = self.means[name]
        if "perplexity" in self.metrics and isinstance(inputs, Mapping):
            ids = inputs["input_ids"].to(scores.device)
            means["perplexity"].add(M.next_token_nll(scores, ids, _token_mask(inputs, scores)))
        if "accuracy" in self.metrics and labels is not None:
            targets = labels.to(scores.device)
            if self.kind.causal_lm:
                scores, targets = M.shift_for_next_token(scores, targets)
            means["accuracy"].add(M.accuracy_counts(scores, targets))

    def results(self) -> dict[str, dict[str, float]]:
        """Per model name, the report keys of the metrics that were accumulated."""
        out: dict[str, dict[str, float]] = {}
        for name, means in self.means.items():
            found: dict[str, float] = {}
            if means["perplexity"].count:
                nll = means["perplexity"]
                found["perplexity"] = M.perplexity(nll.total, nll.count)
            for metric, key in (("accuracy", "accuracy"), ("cosine", "cosine"),
                                ("kl", "kl"), ("agreement", "top1_agreement")):
                if means[metric].count:
                    found[key] = means[metric].value
            out[name] = found
        return out


def _token_mask(inputs: Batch, scores: torch.Tensor) -> torch.Tensor | None:
    """The (B, T) attention mask when ``scores`` are per token (B, T, ...), else None."""
    if not isinstance(inputs, Mapping) or scores.dim() < 3:
        return None
    mask = inputs.get("attention_mask")
    if mask is None or mask.shape != scores.shape[:2]:
        return None
    return mask.to(scores.device)


def model_output(name: str, model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The output tensor of ``model`` on ``batch``; ValueError naming ``name`` on NaN/inf."""
    moved = to_device(batch, device)
    scores = output_tensor(forward(model, moved), split_labels(moved)[0])
    check_finite(name, scores)
    return scores


def check_finite(name: str, scores: torch.Tensor) -> None:
    """Raise ValueError naming the model when its output holds NaN or inf."""
    if scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{name}: the model's output contains NaN or inf values")


def run_quality(
    models: Mapping[str, tuple[nn.Module, torch.device]],
    batches: Sequence[Batch],
    metrics: Sequence[str],
    kind: OutputKind,
) -> dict[str, dict[str, float]]:
    """One pass over ``batches`` with every model; per model, its quality figures."""
    quality = QualityPass(metrics, kind, list(models))
    for batch in batches:
        outputs = {name: model_output(name, m, batch, dev) for name, (m, dev) in models.items()}
        quality.add(to_device(batch, models["model"][1]), outputs)
    return quality.results()
