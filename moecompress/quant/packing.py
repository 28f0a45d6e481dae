"""Bit packing of integer codes: a dense LSB-first bit stream along K per output row.

Row r of `codes` [N, K] becomes int32 words [N, ceil(K*bits/32)]; code k occupies bits
[k*bits, (k+1)*bits) of the row's stream, low bits first, and 3-bit codes straddle words.
For 2/4/8 bits this is exactly compressed-tensors' `pack-quantized` `weight_packed` layout and
the transpose of GPTQ v1 `qweight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .qtensor import QTensor, QuantFormat


def packed_words(k: int, bits: int) -> int:
    return -(-k * bits // 32)


def _bit_positions(k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(k, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (values < 2**bits) -> int32 words [N, ceil(K*bits/32)]."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    n_words = packed_words(k, bits)
    word, shift = _bit_positions(k, bits)
    values = codes.to(torch.int64)
    # Bits never overlap, so a sum is an OR; a code straddling a word boundary spills into word+1.
    words = torch.zeros(n, n_words + 1, dtype=torch.int64)
    words.scatter_add_(1, word.expand(n, k), (values << shift) & 0xFFFFFFFF)
    words.scatter_add_(1, (word + 1).expand(n, k), values >> (32 - shift))
    words = words[:, :n_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 words [N, W] -> uint8 codes [N, K]; the inverse of `pack_codes`."""
    n, n_words = words.shape
    if n_words != packed_words(k, bits):
        raise ValueError(f"{n_words} words cannot hold {k} codes of {bits} bits (expected {packed_words(k, bits)})")
    if 32 % bits == 0:
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int32) * bits
        codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(n, n_words * per_word)[:, :k].to(torch.uint8)
    word, shift = _bit_positions(k, bits)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    unsigned = torch.cat([unsigned, torch.zeros(n, 1, dtype=torch.int64)], dim=1)
    low = unsigned[:, word] >> shift
    high = unsigned[:, word + 1] << (32 - shift)
    return ((low | high) & (2**bits - 1)).to(torch.uint8)


@dataclass
class PackedTensor:
    """On-disk form of a QTensor: `weight_packed` int32, `weight_scale` fp16, `weight_zero_point` uint8."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    shape: tuple[int, int]
    fmt: QuantFormat

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight_packed": self.weight_packed,
            "weight_scale": self.weight_scale,
            "weight_zero_point": self.weight_zero_point,
        }

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def pack(qt: QTensor) -> PackedTensor:
    return PackedTensor(
        pack_codes(qt.codes, qt.fmt.bits), qt.scales.contiguous(), qt.zeros.contiguous(), qt.shape, qt.fmt
    )


def unpack(pt: PackedTensor) -> QTensor:
    codes = unpack_codes(pt.weight_packed, pt.fmt.bits, pt.shape[1])
    return QTensor(codes, pt.weight_scale, pt.weight_zero_point, pt.fmt)
