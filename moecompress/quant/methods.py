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

from ..calibration.budget import gptq_experts_at_once
from ..formats import QTensor, QuantFormat
from .config import QuantizationConfig
from .gptq import quantize_gptq_batched
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

    def experts_at_once(self, width: int) -> int:
        """How many experts whose widest matrix side is `width` `quantize_experts` takes in one call."""
        return 1

    def quantize_experts(self, problems: list[tuple[list[torch.Tensor], object]], formats: list[QuantFormat]):
        """`quantize` of several experts' matrices (`problems`: each expert's weights and Hessian), all in `formats`."""
        return [self.quantize(weights, formats, hessian) for weights, hessian in problems]


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
        return self._batched([(weights, hessian)], formats)[0]

    def experts_at_once(self, width: int) -> int:
        return 1 if self.config.act_order else gptq_experts_at_once(width)

    def quantize_experts(self, problems, formats):
        """Experts without a Hessian by round-to-nearest; the others through one batched GPTQ per group size (a
        matrix in another group size needs its own column loop), each expert's codes those of its own call."""
        out = [None if h is not None else self.quantize(ws, formats, None) for ws, h in problems]
        with_hessian = [b for b, (_, h) in enumerate(problems) if h is not None]
        for b, q in zip(with_hessian, self._batched([problems[b] for b in with_hessian], formats)):
            out[b] = q
        return out

    def _batched(self, problems, formats) -> list[list[QTensor]]:
        if not problems:
            return []
        c, weights = self.config, problems[0][0]
        out = [[None] * len(weights) for _ in problems]
        passes: dict[int, list[int]] = {}
        for k, (w, f) in enumerate(zip(weights, formats)):
            passes.setdefault(f.effective_group(w.shape[1]), []).append(k)
        options = dict(damp=c.damp, act_order=c.act_order, clip_search=c.clip_search, ternary_scale=c.ternary_scale)
        for ks in passes.values():
            group = [([ws[k] for k in ks], h) for ws, h in problems]
            for b, quantized in enumerate(quantize_gptq_batched(group, [formats[k] for k in ks], **options)):
                for k, q in zip(ks, quantized):
                    out[b][k] = q
        return out
