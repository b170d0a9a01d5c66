"""``model.save_pretrained(out)`` on a compressed model writes what ``sl.save`` writes.

transformers' own ``save_pretrained`` would write the compressed tensors under names its loader
does not know, drop ``recipe.json`` and the guard in ``config.json``
(``PretrainedConfig.save_pretrained`` deletes ``transformers_weights`` on purpose), and so
produce a directory that loads as random weights wherever slimline is absent. A compressed
Hugging Face model therefore gets an instance-level ``save_pretrained`` that calls
``sl.save``: the directory it writes loads again with ``from_pretrained`` (slimline
imported), with ``sl.load``, and is refused by transformers alone with a message naming
slimline. The binding lives on the instance (``copy.deepcopy`` re-binds it to the copy), never
on transformers' classes.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from torch import nn

# save_pretrained keywords whose transformers meaning sl.save already has (one safetensors
# file, written by this process), so they are accepted and need no action.
_ACCEPTED = {"safe_serialization": True, "save_original_format": True}


def bind(model: nn.Module) -> None:
    """Give ``model`` (a transformers ``PreTrainedModel``) a ``save_pretrained`` via ``sl.save``."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(save_pretrained, model)  # type: ignore[method-assign,assignment]


def save_pretrained(
    self: nn.Module,
    save_directory: str | Path,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """Write the model with ``sl.save`` (the directory ``from_pretrained`` and ``sl.load`` read).

    Only the main process writes (``is_main_process``), as in transformers. Options that
    ``sl.save`` cannot honour (sharding, variants, pushing to the Hub) are refused by name.
    """
    from slimline.core.checkpoint import save

    refused = sorted(k for k, v in kwargs.items() if _ACCEPTED.get(k, object()) != v
                     and not (k == "state_dict" and v is None))
    if push_to_hub:
        refused.insert(0, "push_to_hub")
    if refused:
        raise ValueError(
            f"save_pretrained of a slimline-compressed model does not support {refused}: it "
            "writes one directory with sl.save; upload that directory with "
            "huggingface_hub.upload_folder"
        )
    if is_main_process:
        save(self, save_directory)
