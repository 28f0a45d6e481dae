"""llama.cpp's block formats (GGML types) as packed formats: the codes we optimize are stored in the type's own
block bytes, so a GGUF file holds them unchanged and llama.cpp dequantizes exactly what we evaluated.

One traits row per type (`GGML_TYPES`, as ggml's `type_traits`): weights per block, weights per scale (`sub`), code
bits, and how a sub-block's value is formed:

    sym   y = s * (u - zero)         Q8_0, Q4_0 (s the block's fp16 d), Q3_K, Q6_K (s = d * sc, sc signed)
    min   y = s * u - off            Q4_1 (s = d, off = -m, both fp16), Q2_K, Q4_K, Q5_K (s = d * sc, off = dmin * m)

In memory a `QTensor` of these formats holds the codes `u` [out, in], the sub-block scale codes `sc` (the fp16 `d`
itself for 32-weight types) as `scales` [out, sub-blocks], the min codes `m` (Q4_1: its fp16 min) or the fixed zero
as `zeros`, and each 256-weight super-block's fp16 (d, dmin) as `super_scales` [out, super-blocks, 2]. `dequantize`
computes in llama.cpp's own order of float32 operations (`gguf.quants`), so the two agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import ggml_blocks
from .base import FORMATS, QuantFormat, register_format
from .qtensor import QTensor


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # weights per block (32, or 256 for K-quants' super-blocks)
    sub: int  # weights per scale
    bits: int  # code bits
    type_size: int  # bytes per block
    zero: int | None  # the fixed zero of a symmetric type; None: a stored min
    scale_bits: int = 0  # bits of a K-quant's sub-block scale code (0: one fp16 scale per block)
    signed_scale: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def k_quant(self) -> bool:
        return self.scale_bits > 0

    @property
    def coarse(self) -> bool:
        """2-3-bit codes: each sub-block's scale is fitted by least squares and its codes chosen again under the
        super-scales as GPTQ reaches it (on moe-tiny-text this closed 51 % instead of 19 % of llama.cpp's Q2_K gap on
        WikiText-2; at 4 bits it did not help: Q4_K's kernel-set ratio 1.00234 against 1.00017 with clipping alone)."""
        return self.bits <= 3

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block


GGML_TYPES = {
    t.name: t
    for t in (
        GGMLType("Q8_0", 32, 32, 8, 34, zero=128),
        GGMLType("Q4_0", 32, 32, 4, 18, zero=8),
        GGMLType("Q4_1", 32, 32, 4, 20, zero=None),
        GGMLType("Q2_K", 256, 16, 2, 84, zero=None, scale_bits=4),
        GGMLType("Q3_K", 256, 16, 3, 110, zero=4, scale_bits=6, signed_scale=True),
        GGMLType("Q4_K", 256, 32, 4, 144, zero=None, scale_bits=6),
        GGMLType("Q5_K", 256, 32, 5, 176, zero=None, scale_bits=6),
        GGMLType("Q6_K", 256, 16, 6, 210, zero=32, scale_bits=8, signed_scale=True),
    )
}
# The type of each bit width, by the family a recipe names: what the LP allocator's candidates become.
LADDERS = {
    "K": {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"},
    "legacy": {4: "Q4_0", 8: "Q8_0"},
    "legacy-min": {4: "Q4_1", 8: "Q8_0"},
}
_LADDER_OF = {"Q4_0": "legacy", "Q4_1": "legacy-min", "Q8_0": "K"}


class GGMLFormat(QuantFormat):
    """A GGML type as a packed format: bits, group size (the sub-block) and symmetry are the type's own."""

    ggml: ClassVar[GGMLType]
    exports: ClassVar[frozenset[str]] = frozenset({"gguf"})
    kernels: ClassVar[bool] = False  # run by the torch reference path (dequantize, then matmul)

    def __post_init__(self) -> None:
        t = self.ggml
        if (self.bits, self.group_size, self.sym) != (t.bits, t.sub, t.zero is not None):
            raise ValueError(
                f"{t.name} has {t.bits}-bit codes in groups of {t.sub} (sym={t.zero is not None}); "
                f"got bits={self.bits}, group_size={self.group_size}, sym={self.sym}"
            )

    @classmethod
    def of_type(cls, name: str) -> GGMLFormat:
        t = GGML_TYPES[name]
        return FORMATS[name](t.bits, t.sub, t.zero is not None)

    @classmethod
    def widths(cls) -> tuple[int, ...]:
        return tuple(sorted(LADDERS[_LADDER_OF.get(cls.ggml.name, "K")]))

    @classmethod
    def for_bits(cls, bits: int, group_size: int, sym: bool) -> QuantFormat:
        """The type of this one's ladder at `bits` (Q4_K's: Q2_K ... Q6_K, Q8_0)."""
        if bits not in cls.widths():
            raise ValueError(
                f"{cls.ggml.name}: no GGML type of {bits} bits next to it; use one of {list(cls.widths())}"
            )
        return cls.of_type(LADDERS[_LADDER_OF.get(cls.ggml.name, "K")][bits])

    @property
    def name(self) -> str:
        return self.ggml.name

    @property
    def maxq(self) -> int:
        return self.ggml.maxq

    @property
    def fixed_zero(self) -> int:
        return self.ggml.zero or 0

    def overhead_bits(self, in_features: int) -> float:
        return self.ggml.bits_per_weight - self.bits

    # --- storage: the type's block bytes, a row of blocks per output row -------------------------------------
    def check_row(self, in_features: int) -> None:
        if in_features % self.ggml.block:
            raise ValueError(
                f"{self.ggml.name} stores rows in blocks of {self.ggml.block} weights; a row of {in_features} "
                f"does not fill whole blocks: use a type with {32 if self.ggml.block == 256 else 1}-weight blocks"
            )

    def stored_shapes(self, out_features: int, in_features: int) -> dict:
        self.check_row(in_features)
        row_bytes = in_features // self.ggml.block * self.ggml.type_size
        return {"weight_packed": ([out_features, row_bytes], torch.uint8)}

    def pack(self, qt: QTensor):
        from .base import PackedTensor

        self.check_row(qt.shape[1])
        return PackedTensor({"weight_packed": ggml_blocks.pack(qt, self.ggml)}, qt.shape, self)

    def unpack(self, pt) -> QTensor:
        codes, scales, zeros, supers = ggml_blocks.unpack(pt.tensors["weight_packed"], self.ggml, pt.shape[1])
        return QTensor(codes, scales, zeros, self, supers)

    def kernel_operand(self, tensors, in_features):
        raise NotImplementedError(f"{self.name} runs through the torch reference path")

    # --- values -----------------------------------------------------------------------------------------------
    def effective(self, scales, zeros, supers) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, zero) of symmetric types, (s, off) of the others, per sub-block [out, sub-blocks] in float32, as
        llama.cpp forms them (y = s * (u - zero), y = s * u - off) from a QTensor's scales, zeros, super_scales."""
        return effective_params(self.ggml, scales, zeros, supers)

    @property
    def offset_grid(self) -> bool:
        """Codes are round((w + off) / s): the types with a stored min."""
        return self.ggml.zero is None

    def dequantize(self, qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s, z = (t.repeat_interleave(self.ggml.sub, dim=1) for t in self.effective(qt.scales, qt.zeros, qt.super_scales))
        u = qt.codes.to(torch.float32)
        return (s * (u - z) if self.ggml.zero is not None else s * u - z).to(dtype)

    # --- the grid ---------------------------------------------------------------------------------------------
    @property
    def span(self) -> int:
        return self.ggml.block

    def span_params(self, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scale codes of one block of columns `w` [rows, block]: each sub-block's scale (and min) of least
        `importance`-weighted error ([rows, block], the input Hessian's diagonal) among `_candidates`, then K-quants'
        sub-scales and mins rounded to their codes under fp16 super-scales. Returns (scales, zeros, super_scales) as a QTensor
        of this format holds them."""
        return choose_block(self.ggml, w.to(torch.float32), importance.to(torch.float32))

    def refine(
        self, w: torch.Tensor, importance: torch.Tensor, supers: torch.Tensor, sc: torch.Tensor, zr: torch.Tensor
    ):
        """K-quants: one sub-block's scale (and min) codes chosen again on its columns `w` [rows, sub] as they are now
        (GPTQ has updated them since the block began), under the block's super-scales `supers` [rows, 2]. Returns
        (sc, zr, s, zero-or-offset) per row, or None for one-level types."""
        t = self.ggml
        if not (t.k_quant and t.coarse):
            return None
        sc, zr = sub_codes(t, w.to(torch.float32), importance.to(torch.float32) + 1e-12, supers, sc, zr)
        return sc, zr, supers[:, 0] * sc, (supers[:, 1] * zr if t.zero is None else zr)

    def round(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> QTensor:
        """Round-to-nearest onto this type's grid (each block's scales chosen as `span_params` does)."""
        out_features, in_features = w.shape
        self.check_row(in_features)
        w = w.to(torch.float32)
        h = torch.ones(in_features) if importance is None else importance.to(torch.float32).clamp(min=0)
        parts = [
            self.span_params(w[:, c : c + self.span], h[c : c + self.span].expand(out_features, -1))
            for c in range(0, in_features, self.span)
        ]
        scales, zeros = torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        supers = torch.cat([p[2] for p in parts], 1) if self.ggml.k_quant else None
        s, z = effective_params(self.ggml, scales, zeros, supers)
        codes = grid_codes(
            self.ggml, w, s.repeat_interleave(self.group_size, 1), z.repeat_interleave(self.group_size, 1)
        )
        return QTensor(codes.to(torch.uint8), scales, zeros, self, supers)


def effective_params(t: GGMLType, scales, zeros, supers) -> tuple[torch.Tensor, torch.Tensor]:
    if not t.k_quant:  # Q4_1 stores its min m: y = d * u + m
        return scales.to(torch.float32), zeros.to(torch.float32) * (1 if t.zero is not None else -1)
    d, dmin = (x.repeat_interleave(t.block // t.sub, dim=1) for x in supers.unbind(-1))
    s = d * scales
    return s, (zeros.to(torch.float32) if t.zero is not None else dmin * zeros)


def grid_codes(t: GGMLType, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Codes (float32) of `w` on effective scales and zeros/offsets of the same shape."""
    q = torch.round(w / s) + z if t.zero is not None else torch.round((w + z) / s)
    return torch.clamp(q, 0, t.maxq)


def _clipped(t: GGMLType, w: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (scale, zero-or-offset) per sub-block row of `w` [n, sub] for a range shrunk by `clip`."""
    if t.zero is not None:
        if t.name == "Q8_0":
            return (w.abs().amax(1) * clip / 127).clamp(min=1e-30), torch.full_like(w[:, 0], t.zero)
        biggest = w.gather(1, w.abs().argmax(1, keepdim=True))[:, 0]  # the largest magnitude lands on code 0
        s = -biggest * clip / t.zero
        return torch.where(s == 0, torch.full_like(s, 1e-30), s), torch.full_like(s, t.zero)
    lo = w.amin(1) if not t.k_quant else w.amin(1).clamp(max=0)
    s = ((w.amax(1) - lo) * clip / t.maxq).clamp(min=1e-30)
    return s, -lo * clip


def _candidates(t: GGMLType, w: torch.Tensor):
    """Float (scale, zero-or-offset) per sub-block row of `w` [n, sub], a few per row. 4 bits and more: the range
    shrunk by up to 20 %. Coarse types: the range's own grid with the number of steps varied around the type's, as
    llama.cpp's make_qkx2_quants / make_qx_quants search (each then refitted by least squares)."""
    if not t.coarse:
        for i in range(9):
            yield _clipped(t, w, 1.0 - i / 40)
        return
    if t.zero is not None:
        biggest = w.gather(1, w.abs().argmax(1, keepdim=True))[:, 0]  # the largest magnitude lands on code 0
        biggest = torch.where(biggest == 0, torch.full_like(biggest, 1e-30), biggest)
        top = t.zero if t.name != "Q8_0" else -127  # Q8_0 symmetric in [-127, 127]
        for step in range(-6, 7):
            yield -biggest / (top + 0.1 * step * (1 if top > 0 else -1)), torch.full_like(biggest, t.zero)
        return
    lo = w.amin(1) if not t.k_quant else w.amin(1).clamp(max=0)
    span = (w.amax(1) - lo).clamp(min=1e-30)
    for step in range(-5, 11):
        yield span / (t.maxq + 0.1 * step), -lo


def _refit(t: GGMLType, w: torch.Tensor, h: torch.Tensor, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
    """The h-weighted least-squares (scale, zero-or-offset) for codes `q`, where it is a valid grid."""
    if t.zero is not None:
        c = q - z[:, None]
        fit = (h * w * c).sum(1) / (h * c * c).sum(1).clamp(min=1e-30)
        return torch.where(fit * s > 0, fit, s), z
    sw, sq, sqq = h.sum(1), (h * q).sum(1), (h * q * q).sum(1)
    sx, sxq = (h * w).sum(1), (h * w * q).sum(1)
    det = sw * sqq - sq * sq
    scale = (sw * sxq - sx * sq) / det.clamp(min=1e-30)
    low = (sqq * sx - sq * sxq) / det.clamp(min=1e-30)  # the value of code 0: -offset
    if t.k_quant:  # K-quants store a subtracted min: code 0 at or below zero
        above = low > 0
        low = torch.where(above, torch.zeros_like(low), low)
        scale = torch.where(above, sxq / sqq.clamp(min=1e-30), scale)
    ok = (det > 0) & (scale > 0)
    return torch.where(ok, scale, s), torch.where(ok, -low, z)


def choose_block(t: GGMLType, w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    rows, span = w.shape
    n_sub = span // t.sub
    ws, hs = w.reshape(rows * n_sub, t.sub), h.reshape(rows * n_sub, t.sub) + 1e-12
    best_s, best_z, best_err = None, None, None
    for s0, z0 in _candidates(t, ws):
        s, z = _refit(t, ws, hs, grid_codes(t, ws, s0[:, None], z0[:, None]), s0, z0) if t.coarse else (s0, z0)
        q = grid_codes(t, ws, s[:, None], z[:, None])
        y = s[:, None] * (q - z[:, None]) if t.zero is not None else s[:, None] * q - z[:, None]
        err = ((ws - y) ** 2 * hs).sum(1)
        if best_err is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    s, z = best_s.reshape(rows, n_sub), best_z.reshape(rows, n_sub)
    if not t.k_quant:
        d = s.to(torch.float16).to(torch.float32)
        d = torch.where(d == 0, torch.full_like(d, 2**-24), d)
        return d, (z if t.zero is not None else (-z).to(torch.float16).to(torch.float32)), None
    sc, zr, supers = _k_codes(t, s, z)
    if not t.coarse:
        return sc, zr, supers
    sup = supers.expand(rows, n_sub, 2).reshape(rows * n_sub, 2)
    sc, zr = sub_codes(t, ws, hs, sup, sc.reshape(-1), zr.reshape(-1))
    return sc.reshape(rows, n_sub), zr.reshape(rows, n_sub), supers


def sub_codes(t: GGMLType, w: torch.Tensor, h: torch.Tensor, supers: torch.Tensor, sc: torch.Tensor, zr: torch.Tensor):
    """K-quants: the sub-block scale (and min) codes of least h-weighted error for the sub-blocks `w` [n, sub] under
    their super-scales `supers` [n, 2], searched within +-2 of `sc`, `zr` (the rounded float ones)."""
    top = 2**t.scale_bits - 1
    low, high = (-(2 ** (t.scale_bits - 1)), 2 ** (t.scale_bits - 1) - 1) if t.signed_scale else (1, top)
    steps = torch.arange(-2, 3, dtype=torch.float32)
    cand_sc = (sc[:, None] + steps).clamp(low, high)  # [n, 5]
    cand_zr = (zr[:, None] + steps).clamp(0, top) if t.zero is None else zr[:, None]
    scale = supers[:, 0, None, None] * cand_sc[:, :, None]  # [n, 5, 1]
    off = supers[:, 1, None, None] * cand_zr[:, None, :] if t.zero is None else zr[:, None, None]  # [n, 1, 5]
    s, o = (scale * torch.ones_like(off)).reshape(len(w), -1), (off * torch.ones_like(scale)).reshape(len(w), -1)
    x = w[:, None, :]
    if t.zero is not None:
        q = torch.clamp(torch.round(x / s[..., None]) + o[..., None], 0, t.maxq)
        y = s[..., None] * (q - o[..., None])
    else:
        q = torch.clamp(torch.round((x + o[..., None]) / s[..., None]), 0, t.maxq)
        y = s[..., None] * q - o[..., None]
    best = ((x - y) ** 2 * h[:, None, :]).sum(-1).argmin(1)  # [n]
    n_zr = cand_zr.shape[1]
    return cand_sc.gather(1, (best // n_zr)[:, None])[:, 0], cand_zr.gather(1, (best % n_zr)[:, None])[:, 0]


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(min=2**-24, max=65504).to(torch.float16).to(torch.float32)


def _k_codes(t: GGMLType, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """K-quants: sub-block scales (and mins) as codes of `scale_bits` under a fp16 super-scale each."""
    if t.signed_scale:
        half = 2 ** (t.scale_bits - 1)
        biggest = s.gather(1, s.abs().argmax(1, keepdim=True))[:, 0]
        sign = torch.where(biggest < 0, 1.0, -1.0)  # the largest scale lands on code -half
        d = sign * _fp16(biggest.abs() / half)
        sc = torch.clamp(torch.round(s / d[:, None]), -half, half - 1)
        sc = torch.where(sc == 0, torch.ones_like(sc), sc)
        return sc, z, torch.stack([d, torch.zeros_like(d)], -1)[:, None, :]
    top = 2**t.scale_bits - 1
    d = _fp16(s.amax(1) / top)
    dmin = _fp16(z.amax(1) / top)
    sc = torch.clamp(torch.round(s / d[:, None]), 1, top)
    m = torch.clamp(torch.round(z / dmin[:, None]), 0, top)
    return sc, m, torch.stack([d, dmin], -1)[:, None, :]


def _make(t: GGMLType) -> type[GGMLFormat]:
    return register_format(type(f"GGML_{t.name}", (GGMLFormat,), {"family": t.name, "ggml": t}))


for _type in GGML_TYPES.values():
    _make(_type)
