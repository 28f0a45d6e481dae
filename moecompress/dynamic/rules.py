"""Dynamic expert skipping rules as pure functions on the router's top-k weights.

Every rule maps routing weights `[T, k]` to a bool keep-mask `[T, k]`; a skipped (token, expert) pair is
simply not computed and its weight not redistributed (no renormalisation), as in MC ODP and MoDES.
"""

from __future__ import annotations

import torch


def top_slot(weights: torch.Tensor) -> torch.Tensor:
    """Bool mask of each token's largest routing weight (the first one on ties)."""
    mask = torch.zeros_like(weights, dtype=torch.bool)
    return mask.scatter_(-1, weights.argmax(dim=-1, keepdim=True), True)


def ratio_keep(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """MC ODP: keep an expert when its weight is at least `beta` x the token's top weight; the top one always."""
    top = weights.max(dim=-1, keepdim=True).values
    return (weights >= beta * top) | top_slot(weights)


def score_keep(weights: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """MoDES: keep an expert when alpha x weight >= tau, with `alpha` and `tau` per token [T] (the layer's
    importance and the threshold for the token's modality). A token may lose all its experts."""
    return alpha[:, None] * weights >= tau[:, None]


def threshold_for_fraction(values: torch.Tensor, fraction: float) -> float:
    """A threshold t with (values < t).mean() as close to `fraction` as the ties in `values` allow."""
    flat = values.flatten().double().sort().values
    if flat.numel() == 0:
        raise ValueError("no values to threshold")
    n = round(min(max(fraction, 0.0), 1.0) * flat.numel())
    if n == 0:
        return float(flat[0])
    if n >= flat.numel():
        return float(torch.nextafter(flat[-1], flat.new_tensor(float("inf"))))
    return float(flat[n])


def relaxed_bernoulli(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Hard {0, 1} samples of sigmoid(logits) whose gradient is that of the Gumbel-sigmoid relaxation
    (straight-through), for training a keep/skip decision per (token, expert)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()
