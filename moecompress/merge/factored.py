"""Factored experts (D²-MoE), the math: an expert's delta D to a shared base, W_i ~= W_0 + A_i B_i, truncated and
rounded, and the allocator's error estimates for each (rank, format). Each expert keeps its own identity in its
delta, where merging collapses it. The delta is truncated either plainly (least weight error) or after whitening by the
expert's input Gram matrix G = X^T X (SVD-LLM): with G = L L^T, ||X D^T||_F = ||D L||_F, so truncating D L keeps
what the expert's own tokens see (least output error on them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..formats import QTensor, QuantFormat
from ..quant.rtn import quantize_rtn


def whitening(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower-triangular L with L L^T = G + damp * mean(diag G) * I (the damping keeps unseen directions)."""
    g = gram.double()
    g = g + damp * float(g.diagonal().mean().clamp(min=1e-12)) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.cholesky(g)


@dataclass
class DeltaSpectrum:
    """An expert projection's delta D [out, in] in whitened coordinates, D L = U S V^T, kept as balanced factors
    `left` = U_R S_R^1/2 [out, R] and `right` = S_R^1/2 V_R^T L^-1 [R, in] (left[:, :r] @ right[:r] is the best
    rank-r delta); `tail[r]` = sum_{j>=r} s_j^2 is the output error of truncating at rank r and `signal` the
    projection's output energy ||W L||^2, both summed over the calibration tokens (plain SVD: L = I)."""

    left: torch.Tensor
    right: torch.Tensor
    s: torch.Tensor
    tail: torch.Tensor
    signal: float


def delta_spectrum(
    delta: torch.Tensor, weight: torch.Tensor, lower: torch.Tensor | None, max_rank: int
) -> DeltaSpectrum:
    """The spectrum of `delta` whitened by `lower` (`whitening(gram)`; None: plain), up to `max_rank`."""
    d, w = delta.double(), weight.double()
    u, s, vh = torch.linalg.svd(d @ lower if lower is not None else d, full_matrices=False)
    r = min(max_rank, s.numel())
    tail = torch.cat([s.pow(2).flip(0).cumsum(0).flip(0), s.new_zeros(1)])[: r + 1]
    root = s[:r].sqrt()
    right = root[:, None] * vh[:r]
    if lower is not None:
        right = torch.linalg.solve_triangular(lower.T, right.T, upper=True).T
    signal = float((w @ lower).pow(2).sum() if lower is not None else w.pow(2).sum())
    return DeltaSpectrum(u[:, :r] * root, right, s[:r], tail, signal)


def candidate_errors(
    spec: DeltaSpectrum, ranks: list[int], formats: list[QuantFormat], lower: torch.Tensor | None
) -> torch.Tensor:
    """[ranks, formats]: the output error of the delta at rank r with both factors rounded to format f, estimated
    as the truncation tail plus, per kept component j, s_j times its factors' rounding error (first order; the
    input-side factor's error measured in the diagonal of the damped Gram L L^T). Both factors are rounded once at
    the largest rank: rows of the input-side factor round independently, so every smaller rank reads its prefix."""
    inputs = spec.right.shape[1]
    diag = (
        lower.pow(2).sum(1) if lower is not None else torch.ones(inputs, dtype=torch.float64, device=spec.right.device)
    )
    table = torch.empty(len(ranks), len(formats), dtype=torch.float64)
    index = torch.tensor(ranks)
    for j, fmt in enumerate(formats):
        d_left = quantize_rtn(spec.left.float(), fmt).dequantize().double() - spec.left
        d_right = quantize_rtn(spec.right.float(), fmt).dequantize().double() - spec.right
        per = spec.s * (d_left.pow(2).sum(0) + (d_right.pow(2) * diag).sum(1))
        table[:, j] = spec.tail[index] + torch.cat([per.new_zeros(1), per.cumsum(0)])[index]
    return table


def dense_errors(
    delta: torch.Tensor,
    formats: list[QuantFormat],
    lower: torch.Tensor | None,
    quantize: Callable[[torch.Tensor, list[QuantFormat]], list[QTensor]] | None = None,
) -> torch.Tensor:
    """[formats]: the output error ||(Q(D) - D) L||^2 of the whole delta rounded in each format, by
    `quantize(w, formats)` (the quantizer that will run, e.g. GPTQ on the expert's Gram, one pass for all) or to
    nearest."""
    w = delta.float()
    errors = []
    for rounded in quantize(w, formats) if quantize is not None else [quantize_rtn(w, f) for f in formats]:
        e = rounded.dequantize().double() - delta.double()
        errors.append(float((e @ lower if lower is not None else e).pow(2).sum()))
    return torch.tensor(errors, dtype=torch.float64)


def quantize_delta(
    delta: torch.Tensor,
    spec: DeltaSpectrum,
    rank: int,
    fmt: QuantFormat,
    gram: torch.Tensor | None,
    quantize: Callable[[torch.Tensor, torch.Tensor, QuantFormat], QTensor],
    damp: float = 0.01,
) -> tuple[QTensor, QTensor]:
    """(lora_A [r, in], lora_B [out, r]) quantized, lora_B @ lora_A ~= delta: `quantize(w, hessian, fmt)` (GPTQ)
    rounds lora_A on the expert's Gram; lora_B is then refit by least squares to the rounded lora_A (absorbing
    its error) and rounded on the Gram of its own inputs."""
    d = delta.double()
    g = gram.double() if gram is not None else torch.eye(d.shape[1], dtype=torch.float64, device=d.device)
    lora_a = quantize(spec.right[:rank].float(), g.float(), fmt)
    a = lora_a.dequantize().double()
    h = a @ g @ a.T
    damped = h + damp * float(h.diagonal().mean().clamp(min=1e-12)) * torch.eye(rank, dtype=h.dtype, device=h.device)
    b = torch.linalg.solve(damped, (d @ g @ a.T).T).T
    return lora_a, quantize(b.float(), h.float(), fmt)
