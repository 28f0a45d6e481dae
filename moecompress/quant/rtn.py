"""Round-to-nearest quantization and the clipping search shared with GPTQ (each format chooses its own grid:
`QuantFormat.group_params`, `QuantFormat.matrix_scales`)."""

from __future__ import annotations

import torch

from ..formats import SCALE_DTYPE, QTensor, QuantFormat, expand_scales


def search_qparams(
    w: torch.Tensor, fmt: QuantFormat, grid: int = 20, max_shrink: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping search: try shrinking the range and keep the lowest squared error."""
    best_scale, best_zero = fmt.group_params(w)
    best_err = _quant_error(w, best_scale, best_zero, fmt)
    for i in range(1, int(max_shrink * grid) + 1):
        scale, zero = fmt.group_params(w, clip=1.0 - i / grid)
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
    """Group-wise round-to-nearest of a [out, in] matrix (formats with whole-matrix scales, ternary: chosen by
    `ternary_scale`; block formats, llama.cpp's types: their own `round`)."""
    if fmt.span:
        return fmt.round(w)
    fixed = fmt.matrix_scales(w, ternary_scale)
    if fixed is not None:
        return round_to_scales(w, fmt, fixed)
    out_features, in_features = w.shape
    group = fmt.effective_group(in_features)
    w = w.to(torch.float32)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=w.device)
    n_groups = fmt.groups(in_features)
    scales = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.float32, device=w.device)
    for g in range(n_groups):
        block = w[:, g * group : (g + 1) * group]
        scale, zero = search_qparams(block, fmt) if clip_search else fmt.group_params(block)
        codes[:, g * group : (g + 1) * group] = quantize_column_block(block, scale, zero, fmt).to(torch.uint8)
        scales[:, g], zeros[:, g] = scale, zero
    return QTensor(codes, scales.to(SCALE_DTYPE), zeros.to(torch.uint8), fmt)


def round_to_scales(w: torch.Tensor, fmt: QuantFormat, scales: torch.Tensor) -> QTensor:
    """Codes of `w` on given scales [scale_rows, groups], every zero point `fmt.fixed_zero`."""
    out_features, in_features = w.shape
    full = expand_scales(scales, out_features).repeat_interleave(fmt.effective_group(in_features), dim=1)
    codes = torch.clamp(torch.round(w.to(torch.float32) / full[:, :in_features]) + fmt.fixed_zero, 0, fmt.maxq)
    zeros = torch.full_like(scales, fmt.fixed_zero, dtype=torch.uint8)
    return QTensor(codes.to(torch.uint8), scales.to(SCALE_DTYPE), zeros, fmt)
