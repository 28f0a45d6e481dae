"""The byte layout of llama.cpp's blocks (ggml-common.h's `block_q4_K` ...), as pure functions: a `QTensor` of a GGML
type <-> uint8 [rows, row bytes], each row its blocks one after another, as a GGUF file stores a tensor.

Bit fields are written by `_fields`: a [blocks, A, F, L] array of `width`-bit values becomes A*L bytes, value
(a, f, l) in bits [f*width, (f+1)*width) of byte a*L + l, the pattern every layout below is made of."""

from __future__ import annotations

import torch

from .qtensor import QTensor


def _fields(x: torch.Tensor, width: int) -> torch.Tensor:
    n, a, f, length = x.shape
    shifts = torch.arange(f, dtype=torch.int64).mul(width).view(1, 1, f, 1)
    return (x.to(torch.int64) << shifts).sum(2).reshape(n, a * length).to(torch.uint8)


def _unfields(b: torch.Tensor, a: int, f: int, length: int, width: int) -> torch.Tensor:
    shifts = torch.arange(f, dtype=torch.int64).mul(width).view(1, 1, f, 1)
    x = (b.to(torch.int64).reshape(-1, a, 1, length) >> shifts) & (2**width - 1)
    return x.reshape(b.shape[0], a * f * length)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


# --- the codes of each type: u [blocks, block] <-> bytes ------------------------------------------------------
def _codes(name: str, u: torch.Tensor) -> list[torch.Tensor]:
    n = u.shape[0]
    if name == "Q8_0":
        return [(u ^ 0x80).to(torch.uint8)]  # int8 q = u - 128, two's complement
    if name in ("Q4_0", "Q4_1"):
        return [_fields(u.view(n, 1, 2, 16), 4)]
    if name == "Q2_K":
        return [_fields(u.view(n, 2, 4, 32), 2)]
    if name == "Q3_K":  # hmask then the low two bits
        return [_fields((u >> 2).view(n, 1, 8, 32), 1), _fields((u & 3).view(n, 2, 4, 32), 2)]
    if name == "Q4_K":
        return [_fields(u.view(n, 4, 2, 32), 4)]
    if name == "Q5_K":  # qh then the low four bits
        return [_fields((u >> 4).view(n, 1, 8, 32), 1), _fields((u & 15).view(n, 4, 2, 32), 4)]
    if name == "Q6_K":  # ql then qh
        return [_fields((u & 15).view(n, 2, 2, 64), 4), _fields((u >> 4).view(n, 2, 4, 32), 2)]
    raise KeyError(name)


def _uncodes(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if name == "Q8_0":
        return parts[0] ^ 0x80
    if name in ("Q4_0", "Q4_1"):
        return _unfields(parts[0], 1, 2, 16, 4)
    if name == "Q2_K":
        return _unfields(parts[0], 2, 4, 32, 2)
    if name == "Q3_K":
        return _unfields(parts[0], 1, 8, 32, 1) << 2 | _unfields(parts[1], 2, 4, 32, 2)
    if name == "Q4_K":
        return _unfields(parts[0], 4, 2, 32, 4)
    if name == "Q5_K":
        return _unfields(parts[0], 1, 8, 32, 1) << 4 | _unfields(parts[1], 4, 2, 32, 4)
    if name == "Q6_K":
        return _unfields(parts[0], 2, 2, 64, 4) | _unfields(parts[1], 2, 4, 32, 2) << 4
    raise KeyError(name)


# --- K-quants' packed 6-bit scales (12 bytes) -----------------------------------------------------------------
def _scales12_q3(v: torch.Tensor) -> torch.Tensor:
    n = v.shape[0]
    return torch.cat([_fields((v & 15).view(n, 1, 2, 8), 4), _fields((v >> 4).view(n, 1, 4, 4), 2)], 1)


def _unscales12_q3(b: torch.Tensor) -> torch.Tensor:
    return _unfields(b[:, :8], 1, 2, 8, 4) | _unfields(b[:, 8:], 1, 4, 4, 2) << 4


def _scales12_q4(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    lo = torch.cat([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6], 1)
    return torch.cat([lo, (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], 1).to(torch.uint8)


def _unscales12_q4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int64)
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 63, (md & 15) | (d >> 2) & 48], 1)
    mn = torch.cat([m & 63, (md >> 4) | (m >> 2) & 48], 1)
    return sc, mn


# --- whole blocks ----------------------------------------------------------------------------------------------
def _block_parts(t, u, sc, zr, sup) -> list[torch.Tensor]:
    """The byte fields of each block in the order the type stores them."""
    if not t.k_quant:
        head = [_half_bytes(sc[:, 0])] + ([_half_bytes(zr[:, 0])] if t.zero is None else [])
        return head + _codes(t.name, u)
    d, dmin = _half_bytes(sup[:, 0]), _half_bytes(sup[:, 1])
    sc, zr = sc.round().to(torch.int64), zr.round().to(torch.int64)
    if t.name == "Q2_K":
        return [(sc | zr << 4).to(torch.uint8), *_codes(t.name, u), d, dmin]
    if t.name == "Q3_K":
        return [*_codes(t.name, u), _scales12_q3(sc + 32), d]
    if t.name == "Q6_K":
        return [*_codes(t.name, u), sc.to(torch.int8).view(torch.uint8), d]
    return [d, dmin, _scales12_q4(sc, zr), *_codes(t.name, u)]  # Q4_K, Q5_K


def _layout(t) -> list[int]:
    """Byte widths of the fields `_block_parts` writes."""
    widths = {
        "Q8_0": [2, 32],
        "Q4_0": [2, 16],
        "Q4_1": [2, 2, 16],
        "Q2_K": [16, 64, 2, 2],
        "Q3_K": [32, 64, 12, 2],
        "Q4_K": [2, 2, 12, 128],
        "Q5_K": [2, 2, 12, 32, 128],
        "Q6_K": [128, 64, 16, 2],
    }[t.name]
    assert sum(widths) == t.type_size
    return widths


def pack(qt: QTensor, t) -> torch.Tensor:
    """uint8 [out, in / block * type_size]: the rows of `qt` as llama.cpp stores them."""
    out_features, in_features = qt.shape
    n = out_features * in_features // t.block
    per = t.block // t.sub
    u = qt.codes.to(torch.int64).reshape(n, t.block)
    sc, zr = qt.scales.reshape(n, per), qt.zeros.reshape(n, per)
    sup = qt.super_scales.reshape(n, 2) if t.k_quant else None
    blocks = torch.cat([p.reshape(n, -1) for p in _block_parts(t, u, sc, zr, sup)], 1)
    return blocks.reshape(out_features, -1).contiguous()


def unpack(data: torch.Tensor, t, in_features: int) -> tuple[torch.Tensor, ...]:
    """(codes, scales, zeros, super_scales) of the rows `data` [out, bytes] holds, as `ggml.GGMLFormat` keeps them."""
    out_features = data.shape[0]
    n = out_features * in_features // t.block
    parts = list(torch.split(data.reshape(n, t.type_size), _layout(t), dim=1))
    per = t.block // t.sub
    supers = None
    if not t.k_quant:
        sc = _half(parts[0])[:, None]
        zr = _half(parts[1])[:, None] if t.zero is None else torch.full((n, 1), float(t.zero))
        u = _uncodes(t.name, parts[-1:])
    else:
        if t.name == "Q2_K":
            raw = parts[0].to(torch.int64)
            sc, zr, u, d, dmin = raw & 15, raw >> 4, _uncodes(t.name, parts[1:2]), parts[2], parts[3]
        elif t.name == "Q3_K":
            u, sc, d = _uncodes(t.name, parts[0:2]), _unscales12_q3(parts[2]) - 32, parts[3]
            zr, dmin = torch.full((n, per), t.zero), None
        elif t.name == "Q6_K":
            u, sc, d = _uncodes(t.name, parts[0:2]), parts[2].contiguous().view(torch.int8), parts[3]
            zr, dmin = torch.full((n, per), t.zero), None
        else:
            d, dmin, (sc, zr), u = parts[0], parts[1], _unscales12_q4(parts[2]), _uncodes(t.name, parts[3:])
        dmin = _half(dmin) if dmin is not None else torch.zeros(n)
        supers = torch.stack([_half(d), dmin], -1).reshape(out_features, -1, 2)
    codes = u.reshape(out_features, in_features).to(torch.uint8)
    scales = sc.to(torch.float32).reshape(out_features, -1)
    return codes, scales, zr.to(torch.float32).reshape(out_features, -1), supers


# --- ternary blocks (TQ1_0, TQ2_0): 256 trits u in {0, 1, 2} (value u - 1) and one fp16 scale ------------------
TERNARY_TYPES = {"TQ1_0": 54, "TQ2_0": 66}  # bytes per block of 256


def _base3(u: torch.Tensor, a: int, digits: int, length: int) -> torch.Tensor:
    """Trits (a, k, l) -> byte (a, l) holding sum_k u * 3**(4-k), as the fraction of 243 rounded up to 256ths that
    llama.cpp's TQ1_0 stores (it reads the k-th trit back as ((byte * 3**k) mod 256 * 3) >> 8)."""
    powers = torch.tensor([81, 27, 9, 3, 1][:digits], dtype=torch.int64).view(1, 1, digits, 1)
    value = (u.reshape(u.shape[0], a, digits, length) * powers).sum(2).reshape(u.shape[0], -1)
    return ((value * 256 + 242) // 243).to(torch.uint8)


def pack_ternary(codes: torch.Tensor, scales: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [out, in / 256 * bytes]: `codes` [out, in] in {0, 1, 2} with one scale per 256 (`scales` [out, in/256])
    as llama.cpp's ternary blocks."""
    out_features, in_features = codes.shape
    n = out_features * in_features // 256
    u = codes.to(torch.int64).reshape(n, 256)
    d = _half_bytes(scales.reshape(n))
    if name == "TQ2_0":
        parts = [_fields(u.view(n, 2, 4, 32), 2), d]
    else:
        parts = [_base3(u[:, :160], 1, 5, 32), _base3(u[:, 160:240], 1, 5, 16), _base3(u[:, 240:], 1, 4, 4), d]
    return torch.cat(parts, 1).reshape(out_features, -1)
