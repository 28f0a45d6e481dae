"""moecompress: compress pretrained (multimodal) Mixture-of-Experts models."""

from . import models  # noqa: F401  registers the adapters
from .api import compress, load
from .errors import MoECompressError
from .io import hf_integration  # noqa: F401  registers the "moecompress" quantizer with transformers
from .recipe import Recipe

__version__ = "0.6.0"
__all__ = ["MoECompressError", "Recipe", "compress", "load", "__version__"]
