"""Triton grouped MoE GEMM over packed experts (more than 8 tokens, prefill), in the manner of vLLM's fused_moe:
the (token, expert) pairs are sorted by expert and padded to the block size, and each program multiplies one
block of pairs with one tile of its expert's rows, decoding the stored codes in the kernel. Every expert has its
own format (bits, group, zero points) and its own tensors, read from a per-expert table of addresses and sizes
(`ProjectionTable`), so LP-mixed layers run in one launch and no weight is copied (base-3 ternary rows are
repacked to 2-bit codes once). Codes are read as stored (little-endian bit streams, docs/FORMAT.md), two bytes
per code so that 3-bit codes may straddle a byte. With `TRITON_INTERPRET=1` the same kernel runs on CPU tensors,
which is how CI tests it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# meta columns per expert: addresses of its packed rows, fp16 scales and uint8 zeros (0: none), and its format
W_PTR, ROW_BYTES, BITS, GROUP, GROUPS, S_PTR, S_ROWSTRIDE, Z_PTR, FIXED_ZERO = range(9)
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
class ProjectionTable:
    """One projection type (gate, up or down) of every expert: per expert the addresses of its tensors and its
    format (`meta`, int64 [E, 9], on the experts' device), from each format's `kernel_operand`. `keep` holds the
    tensors read (a format's repacked codes among them; the modules' own buffers must outlive the table too)."""

    meta: torch.Tensor
    out_features: int
    in_features: int
    keep: list = field(default_factory=list)

    @classmethod
    def build(cls, linears: list) -> ProjectionTable:
        rows, keep = [], []
        for linear in linears:
            fmt, (out_features, in_features) = linear.fmt, (linear.out_features, linear.in_features)
            op = fmt.kernel_operand(linear.stored_tensors(), in_features)
            keep += [t for t in (op.codes, op.scale, op.zero) if t is not None]
            groups = fmt.groups(in_features)
            rows.append(
                [
                    op.codes.data_ptr(),
                    op.codes.shape[1] * op.codes.element_size(),
                    op.bits,
                    fmt.effective_group(in_features),
                    groups,
                    op.scale.data_ptr(),
                    0 if fmt.scale_rows(out_features) == 1 else groups,
                    op.zero.data_ptr() if op.zero is not None else 0,
                    0 if op.zero is not None else op.fixed_zero,
                ]
            )
        device = linears[0].weight_packed.device
        meta = torch.tensor(rows, dtype=torch.int64, device=device)
        return cls(meta, linears[0].out_features, linears[0].in_features, keep)


@triton.autotune(configs=CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _grouped_gemm(
    a_ptr,
    c_ptr,
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
    w_ptr = tl.load(meta + 0).to(tl.pointer_type(tl.uint8))
    row_bytes, bits, group, groups = tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4)
    s_ptr = tl.load(meta + 5).to(tl.pointer_type(tl.float16))
    s_rowstride, z_addr, fixed_zero = tl.load(meta + 6), tl.load(meta + 7), tl.load(meta + 8)
    z_ptr = z_addr.to(tl.pointer_type(tl.uint8))
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
        byte = rows * row_bytes + (bit // 8)[None, :]
        shift = (bit % 8).to(tl.int32)[None, :]
        lo = tl.load(w_ptr + byte, mask=mask, other=0).to(tl.int32)
        hi = tl.load(w_ptr + byte + 1, mask=mask & (shift + bits > 8), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> shift) & ((1 << bits) - 1)
        g = (offs_k // group)[None, :]
        scale = tl.load(s_ptr + rows * s_rowstride + g, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + rows * groups + g, mask=mask & (rows * 0 + z_addr != 0), other=0).to(tl.float32)
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
    proj: ProjectionTable,
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
    tables: tuple[ProjectionTable, ProjectionTable, ProjectionTable],
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
