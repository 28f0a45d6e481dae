"""NAEE-style expert pruning: choose the experts whose removal (with the remaining experts re-routed)
changes the MoE block output least on calibration tokens."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

Router = Callable[[torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def block_output(expert_outputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Routed block output [T, H] from every expert's output on every token `expert_outputs` [E, T, H] and
    top-k routing `weights`, `indices` [T, k]."""
    tokens = torch.arange(indices.shape[0], device=indices.device)[:, None]
    return (expert_outputs[indices, tokens] * weights[..., None].to(expert_outputs.dtype)).sum(1)


def removal_error(expert_outputs: torch.Tensor, route: Router, removed: list[int], reference: torch.Tensor) -> float:
    """||Z - Z_removed||_F^2 where Z_removed re-routes every token without the `removed` experts."""
    excluded = torch.zeros(expert_outputs.shape[0], dtype=torch.bool)
    excluded[removed] = True
    return float((block_output(expert_outputs, *route(excluded)) - reference).pow(2).sum())


def select_experts_to_prune(
    expert_outputs: torch.Tensor, route: Router, count: int, beam: int = 4, exhaustive_limit: int = 2000
) -> tuple[list[int], float]:
    """The `count` experts to remove and the reconstruction error of removing them: exhaustive when there
    are at most `exhaustive_limit` subsets, otherwise a beam search of width `beam` (beam 1 is greedy)."""
    num_experts = expert_outputs.shape[0]
    if not 0 <= count < num_experts:
        raise ValueError(f"cannot remove {count} of {num_experts} experts")
    reference = block_output(expert_outputs, *route(None))
    if count == 0:
        return [], 0.0
    if math.comb(num_experts, count) <= exhaustive_limit:
        subsets = itertools.combinations(range(num_experts), count)
        scored = [(removal_error(expert_outputs, route, list(s), reference), list(s)) for s in subsets]
        error, best = min(scored)
        return best, error
    frontier: list[tuple[float, list[int]]] = [(0.0, [])]
    for _ in range(count):
        candidates = {}
        for _, removed in frontier:
            for e in range(num_experts):
                if e not in removed:
                    key = tuple(sorted([*removed, e]))
                    if key not in candidates:
                        candidates[key] = removal_error(expert_outputs, route, list(key), reference)
        frontier = sorted((err, list(key)) for key, err in candidates.items())[:beam]
    error, best = frontier[0]
    return best, error
