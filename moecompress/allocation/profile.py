"""The allocator's error profile, collected during the calibration pass: for each routed expert and candidate
format, the routing-weighted block-output error of RTN, one projection at a time and all together."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import QuantFormat
from ..models.base import PROJECTIONS, ExpertWeights, MoEBlockView
from ..quant.rtn import quantize_rtn


def _projections(x: torch.Tensor, w: ExpertWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up projections (with their biases, where the experts have them) of tokens x."""
    return F.linear(x, w.gate_proj, w.gate_bias), F.linear(x, w.up_proj, w.up_bias)


class ErrorProfile:
    """A collector for `ExpertObserver`: sees each expert's routed tokens (at most `max_tokens` of them)."""

    def __init__(self, view: MoEBlockView, formats: list[QuantFormat], max_tokens: int = 4096):
        self.formats, self.max_tokens = list(formats), max_tokens
        E = view.num_experts
        self.quant_error = torch.zeros(E, len(self.formats), len(PROJECTIONS) + 1, dtype=torch.float64)
        self.tokens = torch.zeros(E, dtype=torch.float64)
        self._rtn_cache: dict[tuple[int, int], ExpertWeights] = {}

    def observe_expert(self, view: MoEBlockView, e: int, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        """Expert `e`'s inputs `x`, routing weights `w` and outputs `out` for some tokens."""
        if self._rtn_cache and next(iter(self._rtn_cache))[0] not in view.held:  # a chunk done: its copies freed
            self._rtn_cache.clear()
        take = int(min(x.shape[0], self.max_tokens - self.tokens[e]))
        if take <= 0:
            return
        x, w, out = x[:take], w[:take, None], out[:take]
        original = view.expert_weights(e)
        gate, up = _projections(x, original)
        for c in range(len(self.formats)):
            q = self._rtn(e, c, original)
            gate_q, up_q = _projections(x, q)
            variants = (  # (gate, up, down weights) with gate / up / down / all quantized
                (gate_q, up, original),
                (gate, up_q, original),
                (gate, up, q),
                (gate_q, up_q, q),
            )
            for v, (g, u, down) in enumerate(variants):
                mid = view.activation(g, u)
                y = F.linear(mid, down.down_proj, original.down_bias)
                self.quant_error[e, c, v] += float((w * (y - out)).pow(2).sum())
        self.tokens[e] += take

    def _rtn(self, e: int, c: int, original: ExpertWeights) -> ExpertWeights:
        if (e, c) not in self._rtn_cache:
            fmt = self.formats[c]
            self._rtn_cache[(e, c)] = original.replace(
                **{p: quantize_rtn(original[p].float(), fmt).dequantize() for p in PROJECTIONS}
            )
        return self._rtn_cache[(e, c)]

    def record(self, stats, row: int) -> None:
        """Copy into `ExpertStats` row `row`."""
        if stats.quant_error is None:
            stats.candidate_formats = [f.to_dict() for f in self.formats]
            stats.quant_error = torch.zeros(len(stats.layers), *self.quant_error.shape, dtype=torch.float64)
            stats.profile_tokens = torch.zeros(len(stats.layers), stats.num_experts, dtype=torch.float64)
        stats.quant_error[row] = self.quant_error
        stats.profile_tokens[row] = self.tokens
