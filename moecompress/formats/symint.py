"""Symmetric integer codes with the zero point implied, none stored: GPTQ's and compressed-tensors' symmetric
layout. The codes and fp16 scales are those of `IntFormat` with sym=True (every zero point there is 2**(bits-1)),
so a group of 128 weights costs 16 bits of overhead instead of 24 (w4g128: 4.125 bits per weight, not 4.1875)."""

from __future__ import annotations

from typing import ClassVar

from .base import register_format
from .integer import IntFormat


@register_format
class SymIntFormat(IntFormat):
    family: ClassVar[str] = "symint"
    legacy_keys: ClassVar[None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.sym:
            raise ValueError("the symint format stores no zero point: it needs sym=True")

    @property
    def name(self) -> str:
        return super().name.replace("sym", "symint")

    @property
    def zero_bits(self) -> int:
        return 0
