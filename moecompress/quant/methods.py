"""Quantizers: one class per method, registered by name (the recipe's `quantization.method`), each declaring the
calibration statistics it reads (`statistics`, collected by the observer only when a chosen method asks for them).

    @register_quantizer
    class MyMethod(Quantizer):
        name = "my-method"
        statistics = frozenset({"hessian"})

        def round(self, weights, formats, hessian): ...
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..formats import QTensor, QuantFormat
from .config import QuantizationConfig
from .gptq import quantize_gptq_shared
from .rtn import quantize_rtn

QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    if cls.name in QUANTIZERS:
        raise ValueError(f"quantizer '{cls.name}' is registered twice")
    QUANTIZERS[cls.name] = cls
    return cls


def make_quantizer(config: QuantizationConfig) -> Quantizer:
    if config.method not in QUANTIZERS:
        raise ValueError(f"quantization.method '{config.method}': use one of {[*QUANTIZERS, 'none']}")
    return QUANTIZERS[config.method](config)


class Quantizer:
    """Rounds matrices that share their inputs (an expert's gate and up, or one matrix in several formats) to their
    formats. Methods with `statistics` get each expert's input Hessian (None where an expert saw too few tokens and
    the rare-expert policy says so: then round-to-nearest runs, and `used` says so)."""

    name: ClassVar[str] = ""
    statistics: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: QuantizationConfig):
        self.config = config

    def used(self, hessian: torch.Tensor | None) -> str:
        """The method a matrix with these statistics was rounded by (what the reports record)."""
        return self.name if hessian is not None or not self.statistics else RTN.name

    def quantize(self, weights: list[torch.Tensor], formats: list[QuantFormat], hessian=None) -> list[QTensor]:
        if hessian is None and self.statistics:
            return RTN(self.config).round(weights, formats, None)
        return self.round(weights, formats, hessian)

    def round(self, weights: list[torch.Tensor], formats: list[QuantFormat], hessian) -> list[QTensor]:
        raise NotImplementedError


@register_quantizer
class RTN(Quantizer):
    """Round-to-nearest per group (optionally with a clipping search), no calibration statistics."""

    name = "rtn"

    def round(self, weights, formats, hessian):
        c = self.config
        return [quantize_rtn(w, f, c.clip_search, c.ternary_scale) for w, f in zip(weights, formats)]


@register_quantizer
class GPTQ(Quantizer):
    """GPTQ on each expert's input Hessian: one pass per group size shares its factorization and column loop."""

    name = "gptq"
    statistics = frozenset({"hessian"})

    def round(self, weights, formats, hessian):
        c = self.config
        out = [None] * len(weights)
        passes: dict[int, list[int]] = {}
        for k, (w, f) in enumerate(zip(weights, formats)):
            passes.setdefault(f.effective_group(w.shape[1]), []).append(k)
        options = dict(damp=c.damp, act_order=c.act_order, clip_search=c.clip_search, ternary_scale=c.ternary_scale)
        for ks in passes.values():
            shared = quantize_gptq_shared([weights[k] for k in ks], hessian, [formats[k] for k in ks], **options)
            for k, q in zip(ks, shared):
                out[k] = q
        return out
