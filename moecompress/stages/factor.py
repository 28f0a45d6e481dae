"""Factored experts (`factor:`): a quantized shared base and quantized per-expert deltas under a byte budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..calibration.engine import ExpertObserver
from ..distributed import Ranks
from ..formats import QuantFormat
from ..merge.factor_layer import FactorConfig
from ..models import MoEBlockView
from ..quant.experts import quantize_matrices
from ..quant.methods import make_quantizer
from .base import RunContext, Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class FactorStage(Stage):
    """Factored experts (`factor:`): per MoE block an optional quantized shared base and quantized per-expert deltas
    (low-rank, dense or none), their forms, ranks and widths chosen under the byte budget (`merge/factor_layer.py`),
    layer by layer on the calibration data (each layer calibrated on the factored layers before it). It replaces
    the allocation and quantization stages. Streamed (`ctx.store`) as quantization is: each finished layer is
    stored with its layout, and a resumed run starts after the last stored layer."""

    name = "factor"
    order = 30
    section, config = "factor", FactorConfig
    streams = splits = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.factor.enabled

    def validate(self, recipe: Recipe) -> None:
        if not recipe.factor.enabled:
            return
        recipe.factor.validate()
        clashes = [
            (
                recipe.quantization.method == "none",
                "quantization.method none (the factors are quantized: use gptq or rtn)",
            ),
            (
                recipe.allocation.method != "uniform",
                f"allocation.method {recipe.allocation.method} (factor allocates ranks and bits itself)",
            ),
            (recipe.quantization.ternary, "quantization.ternary (factors take integer widths)"),
            (recipe.recovery.enabled, "recovery (it trains per-expert packed weights, not factors)"),
        ]
        for clash, what in clashes:
            if clash:
                recipe.fail(f"factor cannot be combined with {what}; remove one of them.")

    def run(self, ctx: RunContext) -> dict:
        from ..merge.factor_layer import (
            block_layout,
            check_budget,
            factor_block,
            install_factored_experts,
            restore_factored_experts,
        )

        q, f, store = ctx.recipe.quantization, ctx.recipe.factor, ctx.store
        check_budget(ctx.loaded.adapter.moe_blocks(ctx.loaded.model), f, q.format_for)
        views, resume = ctx.layer_views(), ctx.resume_point()
        blocks, done = {}, {}
        for index in store.done() if resume is not None and store is not None else []:
            for view in views.get(index, []):
                record = store.record(index)["factored"][str(view.key)]
                restore_factored_experts(view, record["layout"])
                done[str(view.key)] = record["summary"]

        quantizer = make_quantizer(q)

        def factor_layer(view: MoEBlockView, observer: ExpertObserver) -> bool:
            def quantize(w: torch.Tensor, hessian: torch.Tensor, formats: list[QuantFormat]):
                where = [f"layer {view.key} (factored experts)"] * len(formats)
                return quantize_matrices([w] * len(formats), hessian, formats, quantizer, where)

            blocks[view.key] = factor_block(view, observer, f, q.format_for, quantize, ctx.ranks)
            return True

        def layer_done(index: int, layer: torch.nn.Module, hidden: list[torch.Tensor]) -> None:
            record = {}
            for view in views.get(index, []):
                block = blocks.pop(view.key)
                install_factored_experts(view, block)
                done[str(view.key)] = block.summary()
                record[str(view.key)] = {"layout": block_layout(block), "summary": done[str(view.key)]}
            ctx.store_layer(index, layer, {"factored": record}, hidden)

        ctx.walk(
            self.name,
            factor_layer,
            layer_done,
            resume,
            desc="factor",
            balance=f.modality_weights if f.balance else None,
            ranks=Ranks(),  # every rank walks whole layers; `factor_block` splits the work on their experts
        )
        return {"avg_bits_budget": f.avg_bits, "base_bits": f.base_bits, "whiten": f.whiten, "blocks": done}
