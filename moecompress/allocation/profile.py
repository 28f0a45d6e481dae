"""The allocator's error profile, collected during the calibration pass: for each routed expert and candidate
format, the routing-weighted block-output error of RTN, one projection at a time and all together."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.base import PROJECTIONS, ExpertWeights, MoEBlockView
from ..quant.qtensor import QuantFormat
from ..quant.rtn import quantize_rtn


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
        take = int(min(x.shape[0], self.max_tokens - self.tokens[e]))
        if take <= 0:
            return
        x, w, out = x[:take], w[:take, None], out[:take]
        act = view.experts.act_fn
        original = view.expert_weights(e)
        gate, up = act(F.linear(x, original.gate_proj)), F.linear(x, original.up_proj)
        for c in range(len(self.formats)):
            q = self._rtn(e, c, original)
            gate_q, up_q = act(F.linear(x, q.gate_proj)), F.linear(x, q.up_proj)
            variants = (  # (down input, down weight) with gate / up / down / all quantized
                (gate_q * up, original.down_proj),
                (gate * up_q, original.down_proj),
                (gate * up, q.down_proj),
                (gate_q * up_q, q.down_proj),
            )
            for v, (mid, down) in enumerate(variants):
                self.quant_error[e, c, v] += float((w * (F.linear(mid, down) - out)).pow(2).sum())
        self.tokens[e] += take

    def _rtn(self, e: int, c: int, original: ExpertWeights) -> ExpertWeights:
        if (e, c) not in self._rtn_cache:
            fmt = self.formats[c]
            self._rtn_cache[(e, c)] = ExpertWeights(
                *(quantize_rtn(original[p].float(), fmt).dequantize() for p in PROJECTIONS)
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
