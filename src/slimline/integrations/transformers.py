"""slimline as a transformers quantizer: ``from_pretrained`` reads what ``sl.save`` wrote.

``sl.save`` marks a compressed Hugging Face checkpoint's ``config.json`` with a
``quantization_config`` (``quant_method: "slimline"``: recipe and compressed layers) and a
``transformers_weights`` guard that refuses the directory where slimline is absent
(``export/hf_config.py``). With slimline registered here, transformers' own loader does the
work, in its usual order:

1. ``update_attn_implementation`` — the first hook that sees the config, before the weights
   file is resolved — drops the guard, so ``model.safetensors`` is read;
2. ``_process_model_before_weight_loading`` swaps every recorded layer for slimline's
   compressed module, built empty from its metadata exactly as ``sl.load`` builds it, so that
   transformers fills the packed tensors (codes, scales, int8 weights...) by name;
3. ``get_weight_conversions`` turns each bitmask + values pair of a sparse tensor back into
   the dense tensor;
4. ``_process_model_after_weight_loading`` records the recipe on the model (so ``sl.save``
   and ``slimline eval`` see it) and re-applies the steps whose effect is not in the tensors.

Names are imported from their defining modules (``quantizers.auto``, ``quantizers.base``):
the registration runs while the ``transformers.quantizers`` package is still importing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import (
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from slimline.core import sparse_storage
from slimline.export.hf_config import GUARD_KEY, QUANT_METHOD


class SlimlineConfig(QuantizationConfigMixin):
    """The ``quantization_config`` entry of a slimline checkpoint, as transformers holds it.

    Its fields are those ``export/hf_config.quantization_config`` writes.
    """

    def __init__(
        self,
        *,
        slimline_version: str,
        checkpoint_format: str,
        checkpoint_version: int,
        recipe: dict[str, Any],
        modules: dict[str, Any],
        sparse: dict[str, list[int]],
        **ignored: Any,  # quant_method, and what a later slimline may add
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.slimline_version = slimline_version
        self.checkpoint_format = checkpoint_format
        self.checkpoint_version = checkpoint_version
        self.recipe = recipe
        self.modules = modules
        self.sparse = sparse

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "slimline_version": self.slimline_version,
                "checkpoint_format": self.checkpoint_format,
                "checkpoint_version": self.checkpoint_version, "recipe": self.recipe,
                "modules": self.modules, "sparse": self.sparse}


class SparseDecode(ConversionOps):
    """``name.__mask__`` + ``name.__values__`` → the dense tensor ``name`` (lossless)."""

    def convert(
        self,
        input_dict: dict[str, Any],
        source_patterns: list[str],
        target_patterns: list[str],
        **kwargs: Any,
    ) -> dict[str, list[torch.Tensor]]:
        target: str = kwargs["full_layer_name"]
        model: nn.Module = kwargs["model"]
        (mask,), (values,) = (input_dict[_MASK], input_dict[_VALUES])
        owner, _, leaf = target.rpartition(".")
        # A parameter or a buffer (a packed layer's bias is a buffer).
        shape = tuple(getattr(model.get_submodule(owner), leaf).shape)
        return {target: [sparse_storage.decode(mask, values, shape)]}


# Regexes transformers matches against checkpoint keys; the match is replaced by the target
# (nothing), so both halves of a pair land on the dense tensor's own name.
_MASK = sparse_storage.MASK_SUFFIX.replace(".", r"\.")
_VALUES = sparse_storage.VALUES_SUFFIX.replace(".", r"\.")


class SlimlineHfQuantizer(HfQuantizer):
    """Loads a pre-compressed slimline checkpoint; it never compresses on load."""

    requires_calibration = True  # only pre-compressed checkpoints: sl.compress makes them
    quantization_config: SlimlineConfig

    def update_attn_implementation(self, config: Any) -> Any:
        if hasattr(config, GUARD_KEY):  # the guard is for transformers without slimline
            delattr(config, GUARD_KEY)
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from slimline.core.checkpoint import rebuild_compressed_modules

        modules = _model_names(model, self.quantization_config.modules)
        for name, module in rebuild_compressed_modules(model, modules, _where(model)).items():
            model.set_submodule(name, module)
            _skip_parent_init(model, name)
        return model

    def get_weight_conversions(self) -> list[WeightConverter]:
        if not self.quantization_config.sparse:
            return []
        return [WeightConverter([_MASK, _VALUES], "", [SparseDecode()])]

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from slimline.core.checkpoint import (
            RECIPE_ATTR,
            SOURCE_DIR_ATTR,
            bind_save_pretrained,
            reapply_runtime_steps,
        )

        recipe = self.quantization_config.recipe
        setattr(model, RECIPE_ATTR, recipe)
        directory = str(getattr(model.config, "name_or_path", "") or "")
        if directory and Path(directory).is_dir():  # its tokenizer, sentence-transformers files
            setattr(model, SOURCE_DIR_ATTR, str(Path(directory).resolve()))  # go along on save
        reapply_runtime_steps(model, recipe)
        bind_save_pretrained(model)  # model.save_pretrained(out) writes with sl.save
        return model

    def is_serializable(self) -> bool:
        # transformers' own writer would keep no recipe.json and no guard; the model's
        # save_pretrained is bound to sl.save instead (export/save_pretrained.py).
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _skip_parent_init(model: nn.Module, name: str) -> None:
    """Keep transformers' weight initialisation off the parent of compressed layer ``name``.

    After loading, transformers runs ``_init_weights`` on every module not flagged
    ``_is_hf_initialized``; some models' versions reach into a child's ``.weight`` from the
    parent (GPT-2's attention and MLP re-initialise ``c_proj.weight``), which a packed layer
    does not have. A parent holding no tensors of its own has nothing to initialise, so it is
    flagged as done; its children (the packed layer included) are still checked one by one.
    """
    parent = model.get_submodule(name.rpartition(".")[0])
    own = [*parent.parameters(recurse=False), *parent.buffers(recurse=False)]
    if not own:
        parent._is_hf_initialized = True  # type: ignore[assignment]


def _model_names(model: nn.Module, modules: dict[str, Any]) -> dict[str, Any]:
    """``modules`` keyed by ``model``'s own names: a base model (``AutoModel``) read from a
    checkpoint of its task model lacks the ``base_model_prefix`` (``model.``) of the names."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    own = {name for name, _ in model.named_modules()}
    return {
        name if name in own or not name.startswith(prefix) else name.removeprefix(prefix): entry
        for name, entry in modules.items()
    }


def _where(model: nn.Module) -> Path:
    from slimline.export.hf_config import CONFIG_FILE

    return Path(str(getattr(model.config, "name_or_path", ""))) / CONFIG_FILE


def register() -> None:
    """Make ``quant_method: "slimline"`` known to transformers (idempotent)."""
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return
    register_quantization_config(QUANT_METHOD)(SlimlineConfig)
    register_quantizer(QUANT_METHOD)(SlimlineHfQuantizer)
