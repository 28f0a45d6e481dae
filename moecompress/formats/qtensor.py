"""The one in-memory representation of a quantized weight matrix: integer codes, scales and zero points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import QuantFormat

# Scales are stored as float16 (GPTQ / compressed-tensors convention); quantizing with the
# rounded value keeps the in-memory model bit-identical to the one loaded from disk.
SCALE_DTYPE = torch.float16


@dataclass
class QTensor:
    """codes uint8 [out, in]; scales float16 and zeros uint8, both [scale_rows, groups]:
    w ~= scale[g] * (code - zero[g]). Formats with two levels of scales (llama.cpp's K-quants, `ggml.py`) keep
    their scale codes in `scales` / `zeros` and the fp16 super-scales in `super_scales`."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    fmt: QuantFormat
    super_scales: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.fmt.dequantize(self, dtype)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    """Scales/zeros [rows, groups] with rows = out_features, or 1 (broadcast over the rows)."""
    in_features = codes.shape[1]
    scale = scales.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]
    zero = zeros.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]
    return ((codes.to(torch.float32) - zero) * scale).to(dtype)


def expand_scales(scales: torch.Tensor, out_features: int) -> torch.Tensor:
    """[scale_rows, groups] -> [out_features, groups]."""
    return scales.expand(out_features, -1) if scales.shape[0] == 1 else scales
