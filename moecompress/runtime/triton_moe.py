"""Triton grouped MoE GEMM over packed experts (more than 8 tokens, prefill), in the manner of vLLM's fused_moe:
the (token, expert) pairs are sorted by expert and padded to the block size, and each program multiplies one
block of pairs with one tile of its expert's rows, decoding the stored codes in the kernel. Every expert has its
own format (bits, group, zero points), read from a per-expert table, so LP-mixed layers run in one launch.

The weights of one projection type of all experts are one flat byte buffer (`FlatProjections`, built once at
load); codes are read as stored (little-endian bit streams, docs/FORMAT.md; base-3 ternary repacked to 2-bit
codes), two bytes per code so that 3-bit codes may straddle a byte. With `TRITON_INTERPRET=1` the same kernel
runs on CPU tensors, which is how CI tests it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..quant.packing import pack_codes, unpack_trits

# meta columns per expert
W_OFF, ROW_BYTES, BITS, GROUP, GROUPS, S_OFF, S_ROWSTRIDE, Z_OFF, FIXED_ZERO = range(9)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# BLOCK_M is not tuned: the sorted pairs are padded to it before the launch (`align`).
CONFIGS = (
    [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32})]
    if INTERPRET
    else [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n, k, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 4), (128, 128, 8, 3)]
    ]
)


def block_m(num_pairs: int) -> int:
    """Pairs per program: 16 for decode-like calls (little padding per expert), 64 for prefill."""
    return 16 if INTERPRET or num_pairs <= 1024 else 64


@dataclass
class FlatProjections:
    """One projection type (gate, up or down) of every expert: packed rows, fp16 scales and uint8 zeros as flat
    buffers, and per expert the offsets and format (`meta`, int64 [E, 9])."""

    weight: torch.Tensor  # uint8
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # uint8 (one byte when no expert has zero points)
    meta: torch.Tensor
    out_features: int
    in_features: int

    @classmethod
    def build(cls, linears: list, device: torch.device) -> FlatProjections:
        weights, scales, zeros, meta = [], [], [], []
        w_off = s_off = z_off = 0
        for linear in linears:
            fmt, (out_features, in_features) = linear.fmt, (linear.out_features, linear.in_features)
            packed = linear.weight_packed
            if fmt.packing == "base3":
                packed = pack_codes(unpack_trits(packed.cpu(), in_features), 2).to(packed.device)
            raw = packed.contiguous().view(torch.uint8).reshape(out_features, -1)
            groups, rows = fmt.groups(in_features), fmt.scale_rows(out_features)
            has_zero = linear.weight_zero_point is not None
            meta.append(
                [
                    w_off,
                    raw.shape[1],
                    2 if fmt.ternary else fmt.bits,
                    fmt.effective_group(in_features),
                    groups,
                    s_off,
                    0 if rows == 1 else groups,
                    z_off if has_zero else -1,
                    0 if has_zero else 1,
                ]
            )
            pad = -raw.numel() % 16  # every expert 16-byte aligned (the CUDA kernels' 128-bit loads)
            weights.append(torch.nn.functional.pad(raw.reshape(-1), (0, pad)))
            scales.append(linear.weight_scale.reshape(-1))
            w_off, s_off = w_off + raw.numel() + pad, s_off + linear.weight_scale.numel()
            if has_zero:
                zeros.append(linear.weight_zero_point.reshape(-1))
                z_off += linear.weight_zero_point.numel()
        zero = torch.cat(zeros) if zeros else torch.zeros(1, dtype=torch.uint8)
        return cls(
            torch.cat(weights).to(device),
            torch.cat(scales).to(device),
            zero.to(device),
            torch.tensor(meta, dtype=torch.int64, device=device),
            linears[0].out_features,
            linears[0].in_features,
        )


@triton.autotune(configs=CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _grouped_gemm(
    a_ptr,
    c_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    meta_ptr,
    pairs_ptr,
    block_expert_ptr,
    routing_ptr,
    num_pairs,
    N,
    K,
    top_k,
    MUL_ROUTING: tl.constexpr,
    FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """c[pair, n] = (routing weight *) sum_k a[row(pair), k] * w_e[n, k] for the pairs of one padded block."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    meta = meta_ptr + e * 9
    w_off, row_bytes, bits = tl.load(meta + 0), tl.load(meta + 1), tl.load(meta + 2)
    group, groups, s_off = tl.load(meta + 3), tl.load(meta + 4), tl.load(meta + 5)
    s_rowstride, z_off, fixed_zero = tl.load(meta + 6), tl.load(meta + 7), tl.load(meta + 8)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_m)
    valid = pair < num_pairs
    a_row = pair // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + a_row.to(tl.int64)[:, None] * K + offs_k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0
        )
        mask = n_ok[:, None] & k_ok[None, :]
        bit = offs_k.to(tl.int64) * bits
        byte = w_off + rows * row_bytes + (bit // 8)[None, :]
        shift = (bit % 8).to(tl.int32)[None, :]
        lo = tl.load(w_ptr + byte, mask=mask, other=0).to(tl.int32)
        hi = tl.load(w_ptr + byte + 1, mask=mask & (shift + bits > 8), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)
        g = (offs_k // group)[None, :]
        scale = tl.load(s_ptr + s_off + rows * s_rowstride + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + z_off + rows * groups + g, mask=mask & (rows * 0 + z_off >= 0), other=0).to(tl.float32)
        w = (code.to(tl.float32) - zero - fixed_zero) * scale
        if FP32:
            acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    if MUL_ROUTING:
        acc *= tl.load(routing_ptr + pair, mask=valid, other=0.0)[:, None]
    tl.store(c_ptr + pair.to(tl.int64)[:, None] * N + offs_n[None, :], acc, mask=valid[:, None] & n_ok[None, :])


def align(ids: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, block_expert): the flat (token, slot) pair indices sorted by expert, each expert's run padded to a
    multiple of `block` with the sentinel `ids.numel()`, and the expert of every block (-1: padding, or ids
    outside [0, E), which are skipped). No host synchronisation (CUDA-graph safe): sized for the worst case."""
    flat = ids.reshape(-1)
    count = flat.numel()
    expert = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, expert, torch.ones_like(expert))  # bincount would read its size back to the host
    padded = (counts + block - 1) // block * block
    ends = padded.cumsum(0)
    starts = ends - padded
    capacity = (count + (num_experts + 1) * (block - 1) + block - 1) // block * block
    order = torch.argsort(expert, stable=True)
    sorted_expert = expert[order]
    rank = torch.arange(count, device=ids.device) - (counts.cumsum(0) - counts)[sorted_expert]
    pairs = torch.full((capacity,), count, dtype=torch.int64, device=ids.device)
    pairs[starts[sorted_expert] + rank] = order
    block_start = torch.arange(0, capacity, block, device=ids.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return pairs, block_expert


def grouped_gemm(
    a: torch.Tensor,
    proj: FlatProjections,
    pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    top_k: int,
    routing: torch.Tensor | None = None,
) -> torch.Tensor:
    """c[num_pairs, N]: row pair // top_k of `a` times the pair's expert's projection (times its routing weight
    where given); rows of skipped pairs stay zero."""
    c = torch.zeros(num_pairs, proj.out_features, dtype=torch.float32, device=a.device)

    def grid(meta):
        return (block_expert.numel(), triton.cdiv(proj.out_features, meta["BLOCK_N"]))

    _grouped_gemm[grid](
        a,
        c,
        proj.weight,
        proj.scale,
        proj.zero,
        proj.meta,
        pairs,
        block_expert,
        routing if routing is not None else c,
        num_pairs,
        proj.out_features,
        proj.in_features,
        top_k,
        MUL_ROUTING=routing is not None,
        FP32=a.dtype == torch.float32,
        BLOCK_M=pairs.numel() // block_expert.numel(),
    )
    return c


def experts_forward(
    tables: tuple[FlatProjections, FlatProjections, FlatProjections],
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The MoE layer: gate/up grouped GEMMs, SiLU x up, the down GEMM with the routing weight, summed per token."""
    gate, up, down = tables
    tokens, top_k = top_k_index.shape
    num_pairs = tokens * top_k
    pairs, block_expert = align(top_k_index, gate.meta.shape[0], block_m(num_pairs))
    x = hidden.contiguous()
    h = torch.nn.functional.silu(grouped_gemm(x, gate, pairs, block_expert, num_pairs, top_k))
    h = (h * grouped_gemm(x, up, pairs, block_expert, num_pairs, top_k)).to(x.dtype)
    weights = top_k_weights.reshape(-1).to(torch.float32).contiguous()
    y = grouped_gemm(h, down, pairs, block_expert, num_pairs, 1, weights)
    return y.view(tokens, top_k, -1).sum(1).to(hidden.dtype)
