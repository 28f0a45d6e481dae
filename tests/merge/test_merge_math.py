import pytest
import torch

from moecompress.merge.cluster import cluster_experts
from moecompress.merge.subspace import average_merge, joint_svd, subspace_merge


def test_clusters_recover_planted_groups_and_are_deterministic():
    centers = torch.randn(3, 32)
    features = torch.cat([c + 0.05 * torch.randn(4, 32) for c in centers])
    labels = cluster_experts(features, 3, seed=1)
    groups = [set(labels[i * 4:(i + 1) * 4].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    assert torch.equal(labels, cluster_experts(features, 3, seed=1))


def test_clustering_cannot_collapse_into_one_cluster():
    features = torch.randn(1, 16).repeat(8, 1) + 1e-3 * torch.randn(8, 16)  # all experts nearly identical
    counts = torch.bincount(cluster_experts(features, 4, seed=0), minlength=4)
    assert (counts > 0).all() and counts.max() <= 4  # default cap: ceil(2E / k)
    counts = torch.bincount(cluster_experts(features, 4, seed=0, max_cluster_size=2), minlength=4)
    assert (counts == 2).all()


def test_subspace_merge_at_full_rank_is_the_frequency_weighted_average():
    mats = [torch.randn(24, 40) for _ in range(3)]
    freqs = torch.tensor([5.0, 1.0, 2.0])
    full = subspace_merge(mats, freqs, rank=24)
    assert torch.allclose(full, average_merge(mats, freqs), atol=1e-5)
    low = subspace_merge(mats, freqs, rank=4)
    assert torch.linalg.matrix_rank(low) == 4


def test_joint_svd_reconstructs_each_expert_in_the_shared_basis():
    basis = torch.randn(24, 6)
    mats = [basis @ torch.randn(6, 40) for _ in range(3)]  # experts that truly share a 6-dim output basis
    shared, blocks = joint_svd(mats, rank=6)
    for m, v in zip(mats, blocks):
        assert float((shared @ v.T - m.double()).norm() / m.norm()) < 1e-6


def test_bad_cluster_counts_are_errors():
    with pytest.raises(ValueError, match="clusters"):
        cluster_experts(torch.randn(4, 8), 5)
