"""The ``config.json`` of a saved Hugging Face model, marked when only slimline can load it.

A compressed checkpoint holds tensors transformers does not know (packed int4 codes and scales,
bitmask + values of sparse tensors, pruned shapes its config may not describe). transformers
loads such a directory *without an error*: every unknown tensor is dropped, every missing
weight initialised at random — a model that runs and outputs garbage. Two keys prevent that:

* ``quantization_config`` with ``quant_method: "slimline"`` (the recipe, the slimline version,
  the compressed layers), the plugin hook transformers' quantizers use. An unregistered
  ``quant_method`` is only a logged warning in transformers (``supports_quant_method`` then
  skips quantization), so it cannot be the guard alone;
* ``transformers_weights``, the config key naming the weights file ``from_pretrained`` must read
  (transformers ≥ 5; it never serialises the key itself). A value that is not a ``.safetensors``
  name makes ``from_pretrained`` raise a ValueError quoting it, before any weight is read, so
  the value is the message: it names slimline and how to load the directory.

With slimline imported, transformers reads such a directory itself: slimline registers a
quantizer for ``quant_method: "slimline"`` that drops the guard and builds the compressed layers
before the weights are read (``integrations/transformers.py``).

A model whose recipe leaves the weights as transformers stores them (no step, or only cast,
cache or compile steps) gets neither key and stays loadable by transformers as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimline.core.families import Family

QUANT_METHOD = "slimline"
QUANTIZATION_KEY = "quantization_config"
GUARD_KEY = "transformers_weights"
CONFIG_FILE = "config.json"
# Families whose steps change the stored tensors (values, layout or shapes).
_WEIGHT_CHANGING = frozenset({
    Family.STRUCTURE, Family.PRUNE, Family.FACTORIZE, Family.QUANTIZE, Family.TRAIN,
})


def needs_slimline(manifest: dict[str, Any]) -> bool:
    """Whether transformers alone would misread the checkpoint ``manifest`` describes."""
    return bool(manifest["modules"] or manifest["sparse"]) or changes_weights(manifest["recipe"])


def changes_weights(recipe: dict[str, Any]) -> bool:
    """Whether a step of ``recipe`` changes the stored tensors (values, layout or shapes).

    Read step by step, not as one recipe: a model compressed twice records both recipes, one
    after the other, which as a single recipe may break the order rules (two cache steps).
    """
    from slimline.core.registry import config_type

    return any(config_type(step["method"]).family in _WEIGHT_CHANGING
               for step in recipe["steps"])


def guard_message(manifest: dict[str, Any]) -> str:
    """The text transformers quotes when it refuses the directory (never ``*.safetensors``)."""
    methods = ", ".join(s["method"] for s in manifest["recipe"]["steps"]) or "none"
    return (
        f"this directory is a slimline-compressed checkpoint (recipe: {methods}); transformers "
        "cannot read its weights without slimline. `import slimline` before `from_pretrained` "
        "(pip install slimline), or load it with `sl.load(path)`"
    )


def quantization_config(manifest: dict[str, Any], version: str) -> dict[str, Any]:
    """The ``quantization_config`` entry: recipe, slimline version and compressed layers."""
    return {
        "quant_method": QUANT_METHOD,
        "slimline_version": version,
        "checkpoint_format": manifest["format"],
        "checkpoint_version": manifest["version"],
        "recipe": manifest["recipe"],
        "modules": manifest["modules"],
        "sparse": manifest["sparse"],
    }


def write_config(config: Any, directory: Path, manifest: dict[str, Any]) -> bool:
    """Write ``config.json`` for ``manifest``'s checkpoint; True when it is marked as slimline's."""
    from slimline import __version__

    data: dict[str, Any] = json.loads(config.to_json_string())
    data.pop(GUARD_KEY, None)
    marked = needs_slimline(manifest)
    if marked:
        data[QUANTIZATION_KEY] = quantization_config(manifest, __version__)
        data[GUARD_KEY] = guard_message(manifest)
    elif _is_slimline_entry(data.get(QUANTIZATION_KEY)):
        del data[QUANTIZATION_KEY]
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    (directory / CONFIG_FILE).write_text(text, encoding="utf-8")
    return marked


def strip(config: Any) -> None:
    """Remove slimline's marks from a config read back from a checkpoint (in place).

    The rebuilt model then carries the config it had before ``save``; saving it again writes
    marks that fit its recipe then.
    """
    if _is_slimline_entry(getattr(config, QUANTIZATION_KEY, None)):
        delattr(config, QUANTIZATION_KEY)
    if hasattr(config, GUARD_KEY):
        delattr(config, GUARD_KEY)


def _is_slimline_entry(value: object) -> bool:
    return isinstance(value, dict) and value.get("quant_method") == QUANT_METHOD
