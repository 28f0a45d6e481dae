"""Integer group-wise codes as plain bit streams: 2, 3, 4 or 8 bits, fp16 scales, uint8 zero points per group."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import QuantFormat, register_format
from .bitpack import pack_codes, packed_words, unpack_codes


@register_format
class IntFormat(QuantFormat):
    """Codes in [0, 2**bits) packed LSB-first into int32 words (compressed-tensors' `pack-quantized`, GPTQ v1's
    `qweight` transposed); a zero point is stored per group even when symmetric (it is then 2**(bits-1))."""

    family: ClassVar[str] = "int"
    legacy_keys: ClassVar[dict] = {}
    exports: ClassVar[frozenset[str]] = frozenset({"compressed-tensors", "gptq"})

    @property
    def name(self) -> str:
        group = {-1: "row"}.get(self.group_size, f"g{self.group_size}")
        return f"w{self.bits}{group}{'sym' if self.sym else 'asym'}"

    def packed_columns(self, in_features: int) -> tuple[int, torch.dtype]:
        return packed_words(in_features, self.bits), torch.int32

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, self.bits)

    def unpack_codes(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        return unpack_codes(packed, self.bits, in_features)
