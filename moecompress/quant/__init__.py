"""Quantization methods (`methods.QUANTIZERS`, one class each; a module of this package each, found without an import
list), their recipe section (`config.py`) and the per-block driver (`experts.py`)."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
