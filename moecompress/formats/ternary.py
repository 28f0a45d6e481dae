"""Ternary codes (MoTE / BitNet b1.58 style): w ~= scale * t with t in {-1, 0, +1}, stored as t + 1 in {0, 1, 2}
with the zero fixed at 1 (none stored), an fp16 scale per group (or per row, or one per matrix), packed as 2-bit
codes (`TernaryFormat`) or five trits per byte (`Base3TernaryFormat`, 1.6 bits per weight)."""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import FORMATS, TERNARY, KernelOperand, QuantFormat, register_format
from .bitpack import TRITS_PER_BYTE, pack_codes, pack_trits, packed_words, unpack_codes, unpack_trits
from .qtensor import SCALE_DTYPE

TERNARY_SCALE_METHODS = ("absmean", "lsq")


def ternary_format(group_size: int = 128, packing: str = "base3") -> QuantFormat:
    """The ternary format stored with `packing` ("bits" or "base3")."""
    found = [c for c in FORMATS.values() if getattr(c, "packing", None) == packing]
    if not found:
        raise ValueError(f"ternary packing '{packing}': use one of {ternary_packings()}")
    return found[0](2, group_size, True)


def ternary_packings() -> list[str]:
    return [c.packing for c in FORMATS.values() if getattr(c, "packing", None)]


@register_format
class TernaryFormat(QuantFormat):
    family: ClassVar[str] = TERNARY
    packing: ClassVar[str] = "bits"
    legacy_keys: ClassVar[dict] = {"ternary": True, "packing": "bits"}
    key_name: ClassVar[str] = TERNARY
    tensor_scale: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits != 2 or not self.sym:
            raise ValueError("a ternary format is stored with bits=2 and sym=True")

    @property
    def name(self) -> str:
        group = {-1: "row", 0: "tensor"}.get(self.group_size, f"g{self.group_size}")
        return f"ternary-{group}" + ("" if self.packing == "bits" else f"-{self.packing}")

    @property
    def maxq(self) -> int:
        return 2

    @property
    def zero_bits(self) -> int:
        return 0

    @property
    def fixed_zero(self) -> int:
        return 1

    def matrix_scales(self, w: torch.Tensor, method: str) -> torch.Tensor:
        return ternary_scales(w, self, method)

    def packed_columns(self, in_features: int) -> tuple[int, torch.dtype]:
        return packed_words(in_features, 2), torch.int32

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_codes(codes, 2)

    def unpack_codes(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        return unpack_codes(packed, 2, in_features)


@register_format
class Base3TernaryFormat(TernaryFormat):
    """Five trits per byte; the kernels read a 2-bit repacking made once per module (8 codes per SIMD instruction
    instead of a division chain per trit)."""

    family: ClassVar[str] = "ternary-base3"
    packing: ClassVar[str] = "base3"
    legacy_keys: ClassVar[dict] = {"ternary": True, "packing": "base3"}

    @property
    def code_bits(self) -> float:
        return 8 / TRITS_PER_BYTE

    def packed_columns(self, in_features: int) -> tuple[int, torch.dtype]:
        return -(-in_features // TRITS_PER_BYTE), torch.uint8

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_trits(codes)

    def unpack_codes(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        return unpack_trits(packed, in_features)

    def kernel_operand(self, tensors: dict[str, torch.Tensor], in_features: int) -> KernelOperand:
        packed = tensors["weight_packed"]
        repacked = pack_codes(unpack_trits(packed.cpu(), in_features), 2).to(packed.device)
        return KernelOperand(repacked, 2, tensors["weight_scale"].contiguous(), None, self.fixed_zero)


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
