"""Staged neuron slimming distilled from the source model (`slim:`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..slim.staged import SlimConfig
from ..training.distill import training_batches
from .base import RunContext, Stage, register_stage
from .teacher import distill_teacher

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class SlimStage(Stage):
    """Staged neuron slimming distilled from the source model (`slim:`); resumable from `<output>.slim-state/`."""

    name = "slim"
    order = 20
    section, config = "slim", SlimConfig
    trains = names_the_method = True
    path_keys = ("dataset",)

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.slim.enabled

    def validate(self, recipe: Recipe) -> None:
        if not recipe.slim.enabled:
            return
        recipe.slim.validate()
        if recipe.merge.method != "none" and recipe.merge.router == "keep":
            recipe.fail("slimming needs merge.router shrink (keep-router experts are mapped).")

    def run(self, ctx: RunContext) -> dict:
        from ..slim.staged import slim_experts

        r, loaded = ctx.recipe, ctx.loaded
        teacher = distill_teacher(ctx, self.name) if r.slim.steps_per_stage else None
        data = training_batches(loaded, r.slim, r.calibration, ctx.trust_remote_code) if teacher else []
        return slim_experts(
            loaded.model,
            loaded.adapter,
            teacher.model if teacher else None,
            ctx.batches,
            data,
            r.slim,
            ctx.state_dir("slim"),
            ctx.fingerprint(),
            ctx.progress,
            cpu=ctx.cpu,
        ).to_dict()
