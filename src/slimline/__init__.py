"""slimline: make PyTorch models faster, smaller, cheaper and greener — and measure it."""

# Imported first so that the subpackage is bound to ``slimline.evaluate`` now, and the function
# imported below replaces that binding for good (a later first import of the subpackage
# would rebind the name to the module).
import slimline.evaluate  # noqa: F401
from slimline.api import CompressResult, StepReport, compress, evaluate, list_methods, load, save
from slimline.core.recipe import Recipe
from slimline.core.targets import Targets

__all__ = [
    "CompressResult",
    "Recipe",
    "StepReport",
    "Targets",
    "compress",
    "evaluate",
    "list_methods",
    "load",
    "save",
]
__version__ = "0.1.0"
