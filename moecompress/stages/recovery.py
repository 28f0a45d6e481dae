"""Quantization-aware distillation of the packed experts (`recovery:`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..training.distill import training_batches
from ..training.qat import QAT_INITS, RecoveryConfig
from .base import RunContext, Stage, register_stage
from .teacher import distill_teacher

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class RecoveryStage(Stage):
    """Quantization-aware distillation of the packed experts (`recovery:`); resumable from `<output>.recovery-state/`."""

    name = "recovery"
    order = 60
    section, config = "recovery", RecoveryConfig
    trains = names_the_method = True
    path_keys = ("dataset", "teacher")

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.recovery.enabled

    def validate(self, recipe: Recipe) -> None:
        r = recipe.recovery
        if r.init not in QAT_INITS:
            recipe.fail(f"recovery.init '{r.init}': use one of {list(QAT_INITS)}")
        if r.enabled and recipe.quantization.method == "none":
            recipe.fail("recovery trains quantized experts; set a quantization.method.")
        if r.enabled:
            r.validate()
        reshaped = recipe.slim.enabled or recipe.merge.method != "none"
        if reshaped and r.enabled and r.init == "original":
            recipe.fail(
                "recovery.init original starts from the source experts, which merging/slimming changed; "
                "set recovery.init: quantized."
            )

    def teacher(self, recipe: Recipe) -> str | None:
        return recipe.recovery.teacher

    def run(self, ctx: RunContext) -> dict:
        from ..training.qat import recover_quantized_experts

        r, loaded = ctx.recipe, ctx.loaded
        teacher = distill_teacher(ctx, self.name, r.recovery.teacher)
        data = training_batches(loaded, r.recovery, r.calibration, ctx.trust_remote_code)
        report = recover_quantized_experts(
            loaded.model,
            teacher.model,
            loaded.adapter,
            data,
            r.recovery,
            ctx.state_dir("recovery"),
            ctx.fingerprint(),
            ctx.progress,
            cpu=ctx.cpu,
        )
        loaded.model.eval()
        return report.to_dict()
