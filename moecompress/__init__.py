"""moecompress: compress pretrained (multimodal) Mixture-of-Experts models.

Importing the package registers the "moecompress" quantizer with transformers (so `from_pretrained` loads our
checkpoints); the rest is imported on first use."""

import importlib

from .io import hf_integration  # noqa: F401  registers the "moecompress" quantizer with transformers

__version__ = "0.10.0"
__all__ = ["MoECompressError", "Recipe", "compress", "load", "__version__"]
_LAZY = {"compress": "api", "load": "api", "MoECompressError": "errors", "Recipe": "recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
