"""A dynamic expert-skipping rule fitted on the calibration data (`skip:`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..dynamic.skip import SkipConfig
from ..runtime.packed_experts import set_dequant_cache
from .base import RunContext, Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class SkipStage(Stage):
    """Fit a dynamic expert-skipping rule on the calibration data (`skip:`)."""

    name = "skip"
    order = 70
    section, config = "skip", SkipConfig
    names_the_method = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.skip.method != "none"

    def validate(self, recipe: Recipe) -> None:
        recipe.skip.validate()

    def run(self, ctx: RunContext) -> dict:
        from ..dynamic.skip import fit_skipping

        model = ctx.loaded.model
        set_dequant_cache(model, True)  # many calibration forwards; packed experts dequantized once
        try:
            return fit_skipping(
                model, ctx.loaded.adapter, ctx.batches, ctx.recipe.skip, ctx.progress, cpu=ctx.cpu
            ).rule.to_dict()
        finally:
            set_dequant_cache(model, False)
