"""A routing report (`routing:`): how evenly each MoE layer's calibration tokens reached its experts, and which
experts no token reached (their codes were rounded without data: candidates for pruning or a rare-expert policy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import RunContext, Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@dataclass
class RoutingConfig:
    enabled: bool = False


@register_stage
class RoutingStage(Stage):
    """Per layer from the quantization reports: the routing entropy in bits (log2 E when every expert gets the same
    share), the busiest expert's share over the mean share, and the experts no calibration token reached."""

    name = "routing"
    order = 55  # after quantization, whose reports it reads
    section, config = "routing", RoutingConfig
    streams = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.routing.enabled

    def validate(self, recipe: Recipe) -> None:
        if recipe.routing.enabled and recipe.quantization.method == "none":
            recipe.fail("routing reads the quantization reports; set a quantization.method.")

    def run(self, ctx: RunContext) -> dict:
        layers: dict[int | str, list[int]] = {}
        for r in ctx.quant_reports:
            layers.setdefault(r.layer, []).append(r.tokens)
        rows = [{"layer": key, **routing_balance(tokens)} for key, tokens in layers.items()]
        return {"layers": rows, "unrouted_experts": sum(len(row["unrouted"]) for row in rows)}


def routing_balance(tokens: list[int]) -> dict:
    total = sum(tokens)
    shares = [t / total for t in tokens] if total else [0.0] * len(tokens)
    return {
        "entropy_bits": -sum(p * math.log2(p) for p in shares if p > 0),
        "max_over_mean": max(shares) * len(shares) if total else 0.0,
        "unrouted": [e for e, t in enumerate(tokens) if t == 0],
    }
