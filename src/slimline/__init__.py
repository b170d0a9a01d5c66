"""slimline: make PyTorch models faster, smaller, cheaper and greener — and measure it."""

from typing import TYPE_CHECKING

from slimline.api import (
    CompressResult,
    StepReport,
    compress,
    evaluate,
    export,
    list_methods,
    load,
    save,
)
from slimline.core.recipe import Recipe
from slimline.core.targets import Targets
from slimline.integrations.import_hook import install as _install_transformers_hook
from slimline.search import SearchResult, search

if not TYPE_CHECKING:
    # ``slimline.evaluate`` names both the subpackage and the API function ``sl.evaluate``.
    # One attribute cannot be both, so the subpackage is made callable (it calls the API
    # function): ``sl.evaluate(...)``, ``import slimline.evaluate.metrics`` and
    # ``slimline.evaluate.Report`` then all work, whichever is imported first.
    from slimline._callable_module import make_callable

    evaluate = make_callable("slimline.evaluate", evaluate)
    search = make_callable("slimline.search", search)  # the same, for ``sl.search``
    export = make_callable("slimline.export", export)  # and for ``sl.export``

__all__ = [
    "CompressResult",
    "Recipe",
    "SearchResult",
    "StepReport",
    "Targets",
    "compress",
    "evaluate",
    "export",
    "list_methods",
    "load",
    "save",
    "search",
]
__version__ = "0.1.0"

# transformers' from_pretrained reads slimline checkpoints (slimline/integrations/).
_install_transformers_hook()
