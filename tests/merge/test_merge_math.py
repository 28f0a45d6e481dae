import pytest
import torch

from moecompress.merge.cluster import cluster_experts, group_around_dominant
from moecompress.merge.subspace import average_merge, joint_svd, subspace_merge


def test_clusters_recover_planted_groups_and_are_deterministic():
    centers = torch.randn(3, 32)
    features = torch.cat([c + 0.05 * torch.randn(4, 32) for c in centers])
    labels = cluster_experts(features, 3, seed=1)
    groups = [set(labels[i * 4 : (i + 1) * 4].tolist()) for i in range(3)]
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


def softmax_router(logits: torch.Tensor, top_k: int):
    def route(excluded):
        masked = logits if excluded is None else logits.masked_fill(excluded, float("-inf"))
        weights, indices = torch.softmax(masked, -1).topk(top_k, dim=-1)
        return weights / weights.sum(-1, keepdim=True), indices

    return route


def test_pruning_removes_the_experts_that_matter_least():
    from moecompress.merge.prune import select_experts_to_prune

    torch.manual_seed(0)
    E, T, H = 8, 200, 16
    outputs = torch.randn(E, T, H)
    outputs[2] *= 10  # expert 2 is loud: removing it is expensive
    logits = torch.randn(T, E)
    logits[:, 6] = -20  # expert 6 is never routed: removing it costs nothing
    route = softmax_router(logits, top_k=2)
    exhaustive, err_ex = select_experts_to_prune(outputs, route, 1)
    greedy, err_gr = select_experts_to_prune(outputs, route, 3, beam=1, exhaustive_limit=0)
    best3, err3 = select_experts_to_prune(outputs, route, 3)
    assert exhaustive == [6] and err_ex < 1e-6 and 2 not in best3
    assert err3 <= err_gr + 1e-9  # exhaustive never loses to greedy


def test_neuron_alignment_undoes_a_permutation_of_hidden_units():
    from moecompress.merge.subspace import align_neurons
    from moecompress.models.base import ExpertWeights

    anchor = ExpertWeights(torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32))
    perm = torch.randperm(32)
    shuffled = ExpertWeights(anchor.gate_proj[perm], anchor.up_proj[perm], anchor.down_proj[:, perm])
    aligned = align_neurons(anchor, shuffled)
    assert all(torch.equal(aligned[p], anchor[p]) for p in ("gate_proj", "up_proj", "down_proj"))


def test_dominant_grouping_anchors_clusters_on_the_busiest_experts_and_respects_capacity():
    centers = torch.randn(3, 40)
    # experts 0-2 are the planted centers; 3-8 are noisy copies of them, all rarely routed
    features = torch.cat([centers, centers.repeat(2, 1) + 0.05 * torch.randn(6, 40)])
    frequencies = torch.tensor([0.3, 0.25, 0.2] + [0.01] * 6)
    labels = group_around_dominant(features, frequencies, 3)
    assert labels[:3].tolist() == [0, 1, 2]
    assert labels[3:].tolist() == [0, 1, 2, 0, 1, 2]
    capped = group_around_dominant(features, frequencies, 3, max_cluster_size=3)
    assert torch.bincount(capped).tolist() == [3, 3, 3]
