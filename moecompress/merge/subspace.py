"""Merging the weight matrices of a cluster of experts: plain frequency-weighted averaging, and Sub-MoE's
joint-SVD subspace merge."""

from __future__ import annotations

import torch

from ..models.base import ExpertWeights


def _weights(freqs: torch.Tensor) -> torch.Tensor:
    f = freqs.double().clamp(min=0)
    return f / f.sum() if float(f.sum()) > 0 else torch.full_like(f, 1 / len(f))


def average_merge(matrices: list[torch.Tensor], freqs: torch.Tensor) -> torch.Tensor:
    """sum_i f_i W_i with f the normalised routing frequencies (uniform when all are zero)."""
    f = _weights(freqs)
    return sum(float(f[i]) * matrices[i].double() for i in range(len(matrices))).to(matrices[0].dtype)


def joint_svd(matrices: list[torch.Tensor], rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[W_1 | ... | W_m] ~= (U_r S_r) [V_1^T | ... | V_m^T]: the shared basis U_r S_r [out, r] and the
    expert-specific blocks V_i [in, r]."""
    stacked = torch.cat([m.double() for m in matrices], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    rank = min(rank, s.numel())
    shared = u[:, :rank] * s[:rank]
    blocks = vh[:rank].T.split([m.shape[1] for m in matrices], dim=0)
    return shared, list(blocks)


def subspace_merge(matrices: list[torch.Tensor], freqs: torch.Tensor, rank: int) -> torch.Tensor:
    """Sub-MoE: shared U S from the joint SVD at `rank`, expert-specific V blocks merged by frequency,
    W = U S (sum_i f_i V_i)^T. At full rank this equals `average_merge`."""
    shared, blocks = joint_svd(matrices, rank)
    f = _weights(freqs)
    merged_v = sum(float(f[i]) * blocks[i] for i in range(len(blocks)))
    return (shared @ merged_v.T).to(matrices[0].dtype)


def align_neurons(anchor: ExpertWeights, other: ExpertWeights) -> ExpertWeights:
    """`other` with its intermediate neurons permuted to best match `anchor`'s (Hungarian matching on the
    cosine similarity of each neuron's gate row, up row and down column). A permutation of hidden units
    leaves the expert's function unchanged, but makes element-wise merging combine like with like."""
    from scipy.optimize import linear_sum_assignment

    def neuron_features(w: ExpertWeights) -> torch.Tensor:
        f = torch.cat([w.gate_proj, w.up_proj, w.down_proj.T], dim=1).double()
        return f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)

    similarity = neuron_features(anchor) @ neuron_features(other).T
    _, perm = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    perm = torch.as_tensor(perm, device=other.gate_proj.device)
    return other.replace(
        gate_proj=other.gate_proj[perm],
        up_proj=other.up_proj[perm],
        down_proj=other.down_proj[:, perm],
        **{b: getattr(other, b)[perm] for b in ("gate_bias", "up_bias") if getattr(other, b) is not None},
    )
