"""Gradient checkpointing of Hugging Face models during a training step.

Activations of each decoder / encoder layer are recomputed in the backward pass instead of
kept (Chen et al., arXiv 1604.06174): peak memory falls from O(layers) activations to about
one layer's, for one extra forward. Transformers runs a layer checkpointed only while that
layer is in training mode, so only those layers are switched to it: dropout elsewhere stays
off and the student stays deterministic, as the loss expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def check_checkpointing(model: nn.Module, enabled: bool, *, field: str) -> None:
    """ValueError naming ``field`` when checkpointing is asked of a model that is not a
    Hugging Face model supporting it (call before the model changes)."""
    if enabled and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{field}: {type(model).__name__} does not support gradient checkpointing "
            "(a Hugging Face PreTrainedModel that does is needed)"
        )


@contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool, *, field: str) -> Iterator[None]:
    """Checkpoint ``model``'s layers inside the block when ``enabled``; ValueError naming
    ``field`` when the model is not a Hugging Face model that supports it."""
    check_checkpointing(model, enabled, field=field)
    if not enabled:
        yield
        return
    was_on = checkpointing_on(model)
    # Non-reentrant checkpointing: gradients reach the parameters even when the inputs
    # (token ids) need none. transformers ≥ 5.24 names it "activation checkpointing" (the
    # gradient_* names warn, and go in v6); older releases have only the gradient_* names.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    flags = [m.training for m in layers]
    for m in layers:
        m.training = True  # this module only: its children (dropout) keep their mode
    try:
        yield
    finally:
        for m, flag in zip(layers, flags, strict=True):
            m.training = flag
        if not was_on:
            disable = getattr(model, "activation_checkpointing_disable", None)
            (disable or model.gradient_checkpointing_disable)()  # type: ignore[operator]


def checkpointing_on(model: nn.Module) -> bool:
    """Whether any of ``model``'s layers is checkpointed (transformers' per-layer
    ``gradient_checkpointing`` flag, which both the old and the new API set)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
