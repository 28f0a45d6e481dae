"""Clustering experts by the cosine similarity of their outputs: spherical k-means (k-means++ init), or
MC-SMoE's grouping around the most frequently routed ("dominant") experts."""

from __future__ import annotations

import torch


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of k seeds: the first at random, each next with probability ~ its cosine distance^2 to the
    nearest seed so far."""
    n = points.shape[0]
    seeds = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        distance = (1 - points @ points[seeds].T).clamp(min=0).min(dim=1).values
        weights = distance**2
        weights[seeds] = 0
        if float(weights.sum()) <= 0:  # all remaining points coincide with a seed
            candidates = [i for i in range(n) if i not in seeds]
            seeds.append(candidates[int(torch.randint(len(candidates), (1,), generator=generator))])
        else:
            seeds.append(int(torch.multinomial(weights, 1, generator=generator)))
    return torch.tensor(seeds)


def _assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each point to its most similar centroid, points in order of confidence, clusters closed when full."""
    n, k = similarity.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    sizes = torch.zeros(k, dtype=torch.long)
    order = torch.argsort(similarity.max(dim=1).values, descending=True)
    for i in order.tolist():
        for c in torch.argsort(similarity[i], descending=True).tolist():
            if sizes[c] < capacity:
                labels[i], sizes[c] = c, sizes[c] + 1
                break
    return labels


def _capacity(n: int, k: int, max_cluster_size: int | None) -> int:
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} experts")
    capacity = max_cluster_size or -(-2 * n // k)
    if capacity * k < n:
        raise ValueError(f"max_cluster_size {capacity} x {k} clusters cannot hold {n} experts")
    return capacity


def cluster_experts(
    features: torch.Tensor, k: int, seed: int = 0, iterations: int = 50, max_cluster_size: int | None = None
) -> torch.Tensor:
    """Labels [E] in [0, k) from expert feature vectors [E, D] (e.g. outputs on shared calibration tokens).

    Guards against collapse: every cluster is non-empty, and none holds more than `max_cluster_size`
    experts (default ceil(2E / k)), so one dominant direction cannot swallow the layer.
    """
    n = features.shape[0]
    capacity = _capacity(n, k, max_cluster_size)
    points = _normalize(features.double())
    generator = torch.Generator().manual_seed(seed)
    centroids = points[kmeans_plus_plus(points, k, generator)]
    labels = _assign(points @ centroids.T, capacity)
    for _ in range(iterations):
        for c in range(k):
            members = labels == c
            if members.any():
                centroids[c] = _normalize(points[members].sum(0))
            else:  # empty: reseed at the point least similar to its own centroid
                worst = int(torch.argmin((points * centroids[labels]).sum(1)))
                centroids[c] = points[worst]
        new = _assign(points @ centroids.T, capacity)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def group_around_dominant(
    features: torch.Tensor, frequencies: torch.Tensor, k: int, max_cluster_size: int | None = None
) -> torch.Tensor:
    """Labels [E] in [0, k): the k most frequently routed experts each anchor a cluster (label = rank by
    frequency), every other expert joins the anchor whose outputs are most similar (cosine), at most
    `max_cluster_size` experts per cluster (default ceil(2E / k)). Rarely routed experts, which carry
    little weight in a frequency-weighted merge, are thus never merged with each other while two busy
    experts are forced together."""
    n = features.shape[0]
    capacity = _capacity(n, k, max_cluster_size)
    anchors = torch.argsort(frequencies.double(), descending=True, stable=True)[:k]
    points = _normalize(features.double())
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[anchors] = torch.arange(k)
    others = torch.tensor([e for e in range(n) if e not in set(anchors.tolist())], dtype=torch.long)
    if others.numel():  # each anchor already fills one place of its cluster
        labels[others] = _assign(points[others] @ points[anchors].T, capacity - 1)
    return labels
