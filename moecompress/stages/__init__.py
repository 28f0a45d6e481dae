"""Compression stages, one module each (found without an import list), each a `Stage` registered at its place in
the pipeline: it owns its recipe section, validates it, and runs on one shared `RunContext`. A new stage is its math
in its own package and one module here; the recipe schema and the pipeline pick it up."""

import importlib
import pkgutil

from .base import STAGES, RunContext, Stage, register_stage

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .quantize import plan_allocation  # noqa: E402

__all__ = ["STAGES", "RunContext", "Stage", "plan_allocation", "register_stage"]
