"""Round-to-nearest quantization and the scale/zero computation shared with GPTQ."""

from __future__ import annotations

import torch

from .qtensor import SCALE_DTYPE, QTensor, QuantFormat
from .ternary import quantize_ternary


def compute_qparams(w: torch.Tensor, fmt: QuantFormat, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero for the columns in `w` [rows, cols] (one group).

    Returns float32 scales (already rounded through float16) and float32 integer zeros, both [rows].
    """
    w = w.to(torch.float32)
    xmin = torch.clamp(w.min(dim=1).values, max=0.0) * clip
    xmax = torch.clamp(w.max(dim=1).values, min=0.0) * clip
    if fmt.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmax - xmin) == 0
    xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
    scale = ((xmax - xmin) / fmt.maxq).to(SCALE_DTYPE).to(torch.float32)
    scale = torch.clamp(scale, min=torch.finfo(SCALE_DTYPE).tiny)
    if fmt.sym:
        zero = torch.full_like(scale, 2 ** (fmt.bits - 1))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, fmt.maxq)
    return scale, zero


def search_qparams(
    w: torch.Tensor, fmt: QuantFormat, grid: int = 20, max_shrink: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping search: try shrinking the range and keep the lowest squared error."""
    best_scale, best_zero = compute_qparams(w, fmt)
    best_err = _quant_error(w, best_scale, best_zero, fmt)
    for i in range(1, int(max_shrink * grid) + 1):
        scale, zero = compute_qparams(w, fmt, clip=1.0 - i / grid)
        err = _quant_error(w, scale, zero, fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _quant_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    q = quantize_column_block(w, scale, zero, fmt)
    return ((w - (q - zero[:, None]) * scale[:, None]) ** 2).sum(dim=1)


def quantize_column_block(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Integer codes (as float32) of `w` [rows, cols] with per-row `scale`, `zero` [rows]."""
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, fmt.maxq)


def quantize_rtn(w: torch.Tensor, fmt: QuantFormat, clip_search: bool = False, ternary_scale: str = "lsq") -> QTensor:
    """Group-wise round-to-nearest of a [out, in] matrix (ternary formats: scales by `ternary_scale`)."""
    if fmt.ternary:
        return quantize_ternary(w, fmt, ternary_scale)
    out_features, in_features = w.shape
    group = fmt.effective_group(in_features)
    w = w.to(torch.float32)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    n_groups = fmt.groups(in_features)
    scales = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    qparams = search_qparams if clip_search else compute_qparams
    for g in range(n_groups):
        block = w[:, g * group : (g + 1) * group]
        scale, zero = qparams(block, fmt)
        codes[:, g * group : (g + 1) * group] = quantize_column_block(block, scale, zero, fmt).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero
    return QTensor(codes, scales.to(SCALE_DTYPE), zeros.to(torch.uint8), fmt)
