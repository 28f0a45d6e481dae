"""Neuron importance and slicing for fused expert weights (gate_up [E, 2I, H], down [E, H, I])."""

from __future__ import annotations

import torch

from ..models.base import ExpertWeights


def taylor_neuron_scores(down_proj: torch.Tensor, down_grad: torch.Tensor) -> torch.Tensor:
    """|first-order estimate of the loss change when neuron j of expert e is removed| [E, I], from one batch.

    Removing neuron j zeroes its activation a_j; the first-order change is -sum_t a_tj dL/da_tj, which
    equals -sum_h W_down[h, j] dL/dW_down[h, j]: only the down projection's weight and gradient are needed."""
    return (down_proj.double() * down_grad.double()).sum(dim=1).abs()


def top_neurons(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Indices [E, width] of each expert's `width` highest-scoring neurons, in their original order."""
    if not 0 < width <= scores.shape[1]:
        raise ValueError(f"width {width} outside 1..{scores.shape[1]}")
    return scores.topk(width, dim=1).indices.sort(dim=1).values


def slice_expert(weights: ExpertWeights, keep: torch.Tensor) -> ExpertWeights:
    """One expert keeping only its neurons `keep` [w]: gate/up rows, down columns and the gate/up biases."""
    cut = {
        "gate_proj": weights.gate_proj[keep],
        "up_proj": weights.up_proj[keep],
        "down_proj": weights.down_proj[:, keep],
    }
    cut.update({b: getattr(weights, b)[keep] for b in ("gate_bias", "up_bias") if getattr(weights, b) is not None})
    return weights.replace(**cut)


def stage_widths(width: int, target_width: int, stages: int, multiple_of: int = 8) -> list[int]:
    """Geometrically decreasing expert widths from `width` to `target_width` over `stages` stages (the
    intermediate ones rounded to `multiple_of`)."""
    if not 0 < target_width < width:
        raise ValueError(f"target width {target_width} must be below the current width {width}")
    ratio = target_width / width
    widths = []
    for s in range(1, stages + 1):
        w = target_width if s == stages else round(width * ratio ** (s / stages) / multiple_of) * multiple_of
        widths.append(min(max(w, target_width), width - 1 if not widths else widths[-1]))
    return sorted(set(widths), reverse=True)
