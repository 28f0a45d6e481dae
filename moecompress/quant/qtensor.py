"""The one in-memory representation of a quantized weight matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
# Scales are stored as float16 (GPTQ / compressed-tensors convention); quantizing with the
# rounded value keeps the in-memory model bit-identical to the one loaded from disk.
SCALE_DTYPE = torch.float16
PACKINGS = ("bits", "base3")
# Allocation/plan key of the ternary format (integer formats are keyed by their bit width).
TERNARY = "ternary"


@dataclass(frozen=True)
class QuantFormat:
    """Group-wise format: w ~= scale[g] * (code - zero[g]) with integer codes in [0, maxq].

    Integer formats: codes in [0, 2**bits), fp16 scale and uint8 zero per group.
    Ternary (`ternary=True`, MoTE/BitNet-style): codes {0, 1, 2} = {-1, 0, +1} with the zero fixed at 1
    (so none is stored) and an fp16 scale per group; packed as 2-bit codes (`packing="bits"`) or 5 trits
    per byte (`packing="base3"`, 1.6 bits per weight).
    group_size: columns per scale; -1 one group per row (per output channel); 0 one scale for the whole
    matrix (ternary only).
    """

    bits: int
    group_size: int = 128
    sym: bool = False
    ternary: bool = False
    packing: str = "bits"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size < -1 or (self.group_size == 0 and not self.ternary):
            raise ValueError(
                f"group_size={self.group_size}: use a positive size or -1 for one group per row"
                + (" (0, one scale per tensor, is for ternary only)" if self.group_size == 0 else "")
            )
        if self.packing not in PACKINGS or (self.packing == "base3" and not self.ternary):
            raise ValueError(f"packing '{self.packing}': use 'bits', or 'base3' for ternary formats")
        if self.ternary and (self.bits != 2 or not self.sym):
            raise ValueError("a ternary format is stored with bits=2 and sym=True")

    @classmethod
    def make_ternary(cls, group_size: int = 128, packing: str = "base3") -> QuantFormat:
        return cls(2, group_size, True, ternary=True, packing=packing)

    @property
    def key(self) -> int | str:
        """How plans and allocation candidates name this format: its bit width, or "ternary"."""
        return TERNARY if self.ternary else self.bits

    @property
    def maxq(self) -> int:
        return 2 if self.ternary else 2**self.bits - 1

    @property
    def code_bits(self) -> float:
        """Storage bits per weight of the codes alone."""
        return 1.6 if self.packing == "base3" else float(self.bits)

    def overhead_bits(self, in_features: int) -> float:
        """Storage bits per weight of the scales (fp16) and zeros (uint8, integer formats only)."""
        per_group = 16 + (0 if self.ternary else 8)
        if self.group_size == 0:
            return 0.0
        return per_group / self.effective_group(in_features)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size <= 0 else -(-in_features // self.group_size)

    def scale_rows(self, out_features: int) -> int:
        return 1 if self.group_size == 0 else out_features

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size <= 0 else self.group_size

    @property
    def name(self) -> str:
        group = {-1: "row", 0: "tensor"}.get(self.group_size, f"g{self.group_size}")
        if self.ternary:
            return f"ternary-{group}" + ("-base3" if self.packing == "base3" else "")
        return f"w{self.bits}{group}{'sym' if self.sym else 'asym'}"

    def to_dict(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "sym": self.sym}
        return {**d, "ternary": True, "packing": self.packing} if self.ternary else d

    @classmethod
    def from_dict(cls, d: dict) -> QuantFormat:
        return cls(
            bits=int(d["bits"]),
            group_size=int(d["group_size"]),
            sym=bool(d["sym"]),
            ternary=bool(d.get("ternary", False)),
            packing=str(d.get("packing", "bits")),
        )


@dataclass
class QTensor:
    """codes uint8 [out, in]; scales float16 and zeros uint8, both [scale_rows, groups]."""

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
    """Scales/zeros [rows, groups] with rows = out_features, or 1 (broadcast over the rows)."""
    in_features = codes.shape[1]
    scale = scales.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]
    zero = zeros.to(torch.float32).repeat_interleave(group, dim=1)[:, :in_features]
    return ((codes.to(torch.float32) - zero) * scale).to(dtype)
