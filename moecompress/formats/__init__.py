"""Packed formats: the registry (`FORMATS`), one class per family (a module of this package each, found without an
import list), the in-memory `QTensor` and the bit-packing functions they use."""

import importlib
import pkgutil

from .base import (
    FORMATS,
    SUPPORTED_BITS,
    TERNARY,
    KernelOperand,
    PackedTensor,
    QuantFormat,
    format_class,
    pack,
    register_format,
    unpack,
)
from .qtensor import SCALE_DTYPE, QTensor, dequantize_codes, expand_scales

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from .integer import IntFormat  # noqa: E402
from .ternary import TERNARY_SCALE_METHODS, ternary_format, ternary_packings, ternary_scales  # noqa: E402

__all__ = [
    "FORMATS",
    "SCALE_DTYPE",
    "SUPPORTED_BITS",
    "TERNARY",
    "TERNARY_SCALE_METHODS",
    "IntFormat",
    "KernelOperand",
    "PackedTensor",
    "QTensor",
    "QuantFormat",
    "dequantize_codes",
    "expand_scales",
    "format_class",
    "pack",
    "register_format",
    "ternary_format",
    "ternary_packings",
    "ternary_scales",
    "unpack",
]
