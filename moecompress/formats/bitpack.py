"""Bit packing of integer codes, as pure functions (the formats of this package choose which one they store).

A dense LSB-first bit stream along K per output row:

Row r of `codes` [N, K] becomes int32 words [N, ceil(K*bits/32)]; code k occupies bits
[k*bits, (k+1)*bits) of the row's stream, low bits first, and 3-bit codes straddle words.
For 2/4/8 bits this is exactly compressed-tensors' `pack-quantized` `weight_packed` layout and
the transpose of GPTQ v1 `qweight`.

Ternary codes {0, 1, 2} are packed either as 2-bit codes (above) or in base 3, five trits per byte:
byte j of a row holds codes 5j..5j+4 as sum(code[5j+i] * 3**i) (3**5 = 243 <= 256), 1.6 bits per weight.
"""

from __future__ import annotations

import torch


def packed_words(k: int, bits: int) -> int:
    return -(-k * bits // 32)


def _bit_positions(k: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(k, dtype=torch.int64, device=device) * bits
    return offsets // 32, offsets % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] (values < 2**bits) -> int32 words [N, ceil(K*bits/32)]."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if codes.numel() and int(codes.max()) >= 2**bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    n_words = packed_words(k, bits)
    word, shift = _bit_positions(k, bits, codes.device)
    values = codes.to(torch.int64)
    # Bits never overlap, so a sum is an OR; a code straddling a word boundary spills into word+1.
    words = torch.zeros(n, n_words + 1, dtype=torch.int64, device=codes.device)
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
        shifts = torch.arange(per_word, dtype=torch.int32, device=words.device) * bits
        codes = (words.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(n, n_words * per_word)[:, :k].to(torch.uint8)
    word, shift = _bit_positions(k, bits, words.device)
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    unsigned = torch.cat([unsigned, torch.zeros(n, 1, dtype=torch.int64, device=words.device)], dim=1)
    low = unsigned[:, word] >> shift
    high = unsigned[:, word + 1] << (32 - shift)
    return ((low | high) & (2**bits - 1)).to(torch.uint8)


TRITS_PER_BYTE = 5
_TRIT_POWERS = torch.tensor([3**i for i in range(TRITS_PER_BYTE)], dtype=torch.int32)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in {0, 1, 2} -> uint8 bytes [N, ceil(K/5)]."""
    n, k = codes.shape
    if codes.numel() and int(codes.max()) > 2:
        raise ValueError(f"code {int(codes.max())} is not a trit (0, 1 or 2)")
    pad = -k % TRITS_PER_BYTE
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, pad))
    return (padded.reshape(n, -1, TRITS_PER_BYTE) * _TRIT_POWERS.to(codes.device)).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 bytes [N, ceil(K/5)] -> uint8 codes [N, K]; the inverse of `pack_trits`."""
    n, n_bytes = packed.shape
    if n_bytes != -(-k // TRITS_PER_BYTE):
        raise ValueError(f"{n_bytes} bytes cannot hold {k} trits (expected {-(-k // TRITS_PER_BYTE)})")
    trits = (packed.to(torch.int32)[..., None] // _TRIT_POWERS.to(packed.device)) % 3
    return trits.reshape(n, -1)[:, :k].to(torch.uint8)
