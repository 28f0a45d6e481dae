"""Ternary quantization (MoTE / BitNet b1.58 style): w ~= scale * t with t in {-1, 0, +1}.

Codes are stored as t + 1 in {0, 1, 2} with the zero fixed at 1, so the integer dequantization
`scale * (code - zero)` serves both families.
"""

from __future__ import annotations

import torch

from .qtensor import SCALE_DTYPE, QTensor, QuantFormat

TERNARY_SCALE_METHODS = ("absmean", "lsq")


def _grouped(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] as [scale_rows, groups, members] plus the mask of real (non-padding) members."""
    out_features, in_features = w.shape
    if fmt.group_size == 0:
        return w.reshape(1, 1, -1), torch.ones(1, 1, w.numel(), dtype=torch.bool, device=w.device)
    group, n_groups = fmt.effective_group(in_features), fmt.groups(in_features)
    pad = n_groups * group - in_features
    mask = torch.ones(out_features, in_features, dtype=torch.bool, device=w.device)
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return w.reshape(out_features, n_groups, group), mask.reshape(out_features, n_groups, group)


def ternary_scales(w: torch.Tensor, fmt: QuantFormat, method: str = "lsq", iterations: int = 10) -> torch.Tensor:
    """float32 scales [scale_rows, groups] (rounded through fp16).

    absmean: BitNet's mean |w| of the group.
    lsq: starting from absmean, alternate t = clamp(round(w / s), -1, 1) and the least-squares
         s = <w, t> / <t, t> (Lloyd iterations; the squared error never increases).
    """
    if method not in TERNARY_SCALE_METHODS:
        raise ValueError(f"ternary scale method '{method}': use one of {TERNARY_SCALE_METHODS}")
    grouped, mask = _grouped(w.to(torch.float32), fmt)
    count = mask.sum(-1).clamp(min=1)
    scale = grouped.abs().sum(-1) / count
    if method == "lsq":
        for _ in range(iterations):
            t = torch.clamp(torch.round(grouped / scale.clamp(min=1e-12)[..., None]), -1, 1) * mask
            nonzero = (t * t).sum(-1)
            scale = torch.where(nonzero > 0, (grouped * t).sum(-1) / nonzero.clamp(min=1), scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale.to(SCALE_DTYPE).to(torch.float32).clamp(min=torch.finfo(SCALE_DTYPE).tiny)


def expand_scales(scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """[scale_rows, groups] -> [out_features, groups]."""
    return scales.expand(out_features, -1) if scales.shape[0] == 1 else scales


def quantize_ternary(w: torch.Tensor, fmt: QuantFormat, scale_method: str = "lsq") -> QTensor:
    """Round-to-nearest ternarization of a [out, in] matrix with scales chosen by `scale_method`."""
    if not fmt.ternary:
        raise ValueError(f"quantize_ternary needs a ternary format, got {fmt.name}")
    out_features, in_features = w.shape
    scales = ternary_scales(w, fmt, scale_method)
    group = fmt.effective_group(in_features)
    full = expand_scales(scales, out_features).repeat_interleave(group, dim=1)[:, :in_features]
    codes = torch.clamp(torch.round(w.to(torch.float32) / full), -1, 1) + 1
    zeros = torch.ones_like(scales, dtype=torch.uint8)
    return QTensor(codes.to(torch.uint8), scales.to(SCALE_DTYPE), zeros, fmt)
