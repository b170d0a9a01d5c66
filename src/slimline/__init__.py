"""slimline: make PyTorch models faster, smaller, cheaper and greener — and measure it."""

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
