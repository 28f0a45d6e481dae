"""The `quantization:` section of a recipe: which method rounds the routed experts, in which format."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..formats import FORMATS, TERNARY, QuantFormat, ternary_format

RARE_POLICIES = ("pool", "rtn", "own")


@dataclass
class RareExpertConfig:
    """What to do with an expert routed fewer than `min_tokens` calibration tokens (methods that need statistics).

    pool: add random block-input tokens (the observer's reservoir) to its own until it has `min_tokens`,
          each pooled token weighted like an own token; the method then runs on those statistics.
    rtn:  round-to-nearest instead.
    own:  the method on its own tokens whatever their number (RTN when it saw none).
    """

    policy: str = "pool"
    min_tokens: int = 256


@dataclass
class QuantizationConfig:
    """Routed-expert quantization: `method` one of the registered quantizers (`quant.methods.QUANTIZERS`) or none;
    `packed_format` the format family of the integer widths (a llama.cpp type such as Q4_K names its own bits and
    blocks, and its ladder gives the other widths: 2 -> Q2_K, 3 -> Q3_K ...). `ternary: true` quantizes every expert to
    {-1, 0, 1} x scale instead of `bits` (group_size 0 = one scale per tensor, -1 = per output channel); ternary is
    also an allocation candidate, with the same ternary_* settings."""

    method: str = "gptq"
    packed_format: str = "int"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False
    ternary: bool = False
    ternary_packing: str = "base3"
    ternary_scale: str = "lsq"
    rare_experts: RareExpertConfig = field(default_factory=RareExpertConfig)

    @property
    def format(self) -> QuantFormat:
        return self.format_for(TERNARY if self.ternary else self.bits)

    def format_for(self, key: int | str) -> QuantFormat:
        """The format an allocation candidate key (a bit width or "ternary") stands for."""
        if key == TERNARY:
            return ternary_format(self.group_size, self.ternary_packing)
        return FORMATS[self.packed_format].for_bits(int(key), self.group_size, self.sym)
