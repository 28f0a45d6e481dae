"""The one in-memory representation of a quantized weight matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantFormat:
    """Integer group-wise format: w ~= scale[g] * (code - zero[g]) with codes in [0, 2**bits)."""

    bits: int
    group_size: int = 128
    sym: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group_size={self.group_size}: use a positive size or -1 for one group per row")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    @property
    def name(self) -> str:
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"w{self.bits}{group}{'sym' if self.sym else 'asym'}"

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}

    @classmethod
    def from_dict(cls, d: dict) -> QuantFormat:
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), sym=bool(d["sym"]))


SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QTensor:
    """codes uint8 [out, in]; scales float16 [out, groups]; zeros uint8 [out, groups]."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    fmt: QuantFormat

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scales, self.zeros, self.fmt.effective_group(self.shape[1]), dtype)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, dtype: torch.dtype
) -> torch.Tensor:
    out_features, in_features = codes.shape
    scale = scales.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]
    zero = zeros.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]
    return ((codes.to(torch.float32) - zero) * scale).to(dtype)
