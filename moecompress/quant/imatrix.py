"""Importance-weighted round-to-nearest (llama.cpp's importance-matrix quantization): each group's clipping and scale
minimize sum_k h_k (w_k - w^_k)^2 with h_k the diagonal of the input Hessian, the energy of input channel k over the
calibration tokens. No error feedback between columns, so it runs at RTN's speed; it beats plain RTN where a few
input channels carry most of the activation energy, as in trained transformers."""

from __future__ import annotations

import torch

from ..formats import SCALE_DTYPE, QTensor, QuantFormat
from .methods import Quantizer, register_quantizer
from .rtn import quantize_column_block, round_to_scales

CLIPS = [1.0 - i / 40 for i in range(13)]  # shrink the range by up to 30 %, in steps of 2.5 %


@register_quantizer
class ImatrixRTN(Quantizer):
    name = "rtn-imatrix"
    statistics = frozenset({"hessian"})

    def round(self, weights, formats, hessian):
        importance = torch.diagonal(hessian).to(torch.float32).clamp(min=0)
        return [self._round_one(w.to(torch.float32), f, importance) for w, f in zip(weights, formats)]

    def _round_one(self, w: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor) -> QTensor:
        if fmt.span:  # llama.cpp's types weigh their own block search
            return fmt.round(w, importance)
        fixed = fmt.matrix_scales(w, self.config.ternary_scale)
        if fixed is not None:  # scales fixed by the whole matrix: only the rounding is left
            return round_to_scales(w, fmt, fixed)
        out_features, in_features = w.shape
        group, n_groups = fmt.effective_group(in_features), fmt.groups(in_features)
        codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
        scales = torch.empty(out_features, n_groups, device=w.device)
        zeros = torch.empty_like(scales)
        for g in range(n_groups):
            cols = slice(g * group, (g + 1) * group)
            q, scales[:, g], zeros[:, g] = weighted_group(w[:, cols], importance[cols], fmt)
            codes[:, cols] = q.to(torch.uint8)
        return QTensor(codes, scales.to(SCALE_DTYPE), zeros.to(torch.uint8), fmt)


def weighted_group(block: torch.Tensor, h: torch.Tensor, fmt: QuantFormat):
    """(codes, scale, zero) of one group [rows, cols] minimizing the h-weighted squared error per row: the best of
    the clipped ranges in `CLIPS`, then the weighted least-squares scale for those codes where it is better."""
    h = h + 1e-8 * h.mean().clamp(min=1e-30)  # a dead channel still breaks ties

    def error(q, scale, zero):
        return ((block - (q - zero[:, None]) * scale[:, None]) ** 2 * h).sum(1)

    best = None
    for clip in CLIPS:
        scale, zero = fmt.group_params(block, clip)
        q = quantize_column_block(block, scale, zero, fmt)
        err = error(q, scale, zero)
        if best is None:
            best = [q, scale, zero, err]
            continue
        better = err < best[3]
        best = [
            torch.where(better[:, None], q, best[0]),
            *(torch.where(better, a, b) for a, b in zip((scale, zero, err), best[1:])),
        ]
    q, scale, zero, err = best
    centered = q - zero[:, None]
    fitted = (h * block * centered).sum(1) / (h * centered**2).sum(1).clamp(min=1e-30)
    fitted = fitted.to(SCALE_DTYPE).to(torch.float32)
    refit = quantize_column_block(block, fitted.clamp(min=torch.finfo(SCALE_DTYPE).tiny), zero, fmt)
    better = (fitted > 0) & (error(refit, fitted, zero) < err)
    return torch.where(better[:, None], refit, q), torch.where(better, fitted, scale), zero
