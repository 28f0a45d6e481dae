"""Factored experts (D²-MoE): a group's expert matrices as one shared base and a low-rank delta per expert,
W_i ~= W_0 + A_i B_i, with W_0 their frequency-weighted mean. Each expert keeps its own identity in its delta,
where merging collapses it. The delta is truncated either plainly (least weight error) or after whitening by the
expert's input Gram matrix G = X^T X (SVD-LLM): with G = L L^T, ||X D^T||_F = ||D L||_F, so truncating D L keeps
what the expert's own tokens see (least output error on them)."""

from __future__ import annotations

import torch

from .subspace import average_merge


def whitening(gram: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower-triangular L with L L^T = G + damp * mean(diag G) * I (the damping keeps unseen directions)."""
    g = gram.double()
    g = g + damp * float(g.diagonal().mean().clamp(min=1e-12)) * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.linalg.cholesky(g)


def low_rank(delta: torch.Tensor, rank: int, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [out, r], B [r, in]) with A B the best rank-r approximation of `delta` [out, in]: in the Frobenius norm,
    or, given the input Gram matrix, in the norm of the outputs on those inputs."""
    d = delta.double()
    if gram is None:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        return u[:, :rank] * s[:rank], vh[:rank]
    lower = whitening(gram)
    u, s, vh = torch.linalg.svd(d @ lower, full_matrices=False)
    # B = V_r^T L^-1: solve L^T B^T = V_r
    b = torch.linalg.solve_triangular(lower.T, vh[:rank].T, upper=True).T
    return u[:, :rank] * s[:rank], b


def factor_experts(
    matrices: list[torch.Tensor], freqs: torch.Tensor, rank: int, grams: list[torch.Tensor | None] | None = None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The shared base (frequency-weighted mean) and each expert's rank-`rank` delta factors, whitened by its
    Gram matrix where `grams` gives one (an expert that saw no token is truncated plainly)."""
    base = average_merge([m.double() for m in matrices], freqs)
    grams = grams or [None] * len(matrices)
    return base, [low_rank(m.double() - base, rank, g) for m, g in zip(matrices, grams)]


def rank_for_budget(out_features: int, in_features: int, experts: int, fraction: float) -> int:
    """The largest delta rank whose base plus `experts` factor pairs hold at most `fraction` of the experts' dense
    parameters: out x in + experts x r x (out + in) <= fraction x experts x out x in."""
    spare = fraction * experts * out_features * in_features - out_features * in_features
    return max(int(spare // (experts * (out_features + in_features))), 0)
