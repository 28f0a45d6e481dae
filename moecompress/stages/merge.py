"""Sub-MoE / averaging / pruning of the routed experts (`merge:`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..merge.apply import MergeConfig
from .base import RunContext, Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class MergeStage(Stage):
    """Sub-MoE / averaging / pruning: fewer routed experts per layer (`merge:`). Streamed, each merged layer is kept
    in float32 in `<output>.compress-state/scratch/merged/` for the quantization pass (a resumed run merges again: the
    merge is deterministic, and cheap next to GPTQ)."""

    name = "merge"
    order = 10
    section, config = "merge", MergeConfig
    streams = names_the_method = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.merge.method != "none"

    def validate(self, recipe: Recipe) -> None:
        recipe.merge.validate()
        if recipe.merge.method != "none" and recipe.merge.router == "keep" and recipe.quantization.method != "none":
            recipe.fail("merge.router keep cannot be quantized yet; use merge.router: shrink.")

    def run(self, ctx: RunContext) -> dict:
        from ..merge.apply import reduce_experts

        m = ctx.recipe.merge
        if ctx.store is not None:  # streamed: merged layers wait on disk for the quantization pass
            ctx.loaded.work_dir = ctx.store.scratch("merged")
        with ctx.activations(self.name) as holding:
            reductions = reduce_experts(ctx.loaded, ctx.batches, m, ctx.recipe.device, ctx.progress, holding)
        return {
            "method": m.method,
            "router": m.router,
            "experts_per_layer": [r.kept for r in reductions],
            "prune_errors": [r.error for r in reductions if r.error is not None],
        }
