"""The linear layers outside the routed experts quantized (`dense:`): attention, shared experts, dense MLPs, LM head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from ..formats import IntFormat
from ..quant.dense import (
    DENSE_KINDS,
    DENSE_METHODS,
    DenseQuantConfig,
    dense_targets,
    input_hessians,
    quantize_linear,
    relative_error,
    untie_lm_head,
)
from ..runtime.packed_experts import set_dequant_cache
from ..runtime.quantized_linear import install_quantized_linear
from .base import RunContext, Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class DenseQuantStage(Stage):
    """GPTQ (or RTN) of the chosen non-expert linears, each replaced by a `QuantizedLinear`. It needs the whole
    model in memory (one calibration pass for every layer's inputs), so a recipe with it does not stream."""

    name = "dense"
    order = 65  # after the experts' quantization and recovery: the Hessians see the experts as they will be
    section, config = "dense", DenseQuantConfig

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.dense.bits != 0

    def validate(self, recipe: Recipe) -> None:
        d = recipe.dense
        checks = [
            (d.bits == 0 or d.bits in IntFormat.widths(), f"dense.bits {d.bits}: use 0 (off) or {IntFormat.widths()}"),
            (d.group_size == -1 or d.group_size > 0, f"dense.group_size {d.group_size}: use a positive size or -1"),
            (d.method in DENSE_METHODS, f"dense.method '{d.method}': use one of {list(DENSE_METHODS)}"),
            (
                bool(d.targets) and set(d.targets) <= set(DENSE_KINDS),
                f"dense.targets {d.targets}: choose among {list(DENSE_KINDS)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                recipe.fail(message)

    def run(self, ctx: RunContext) -> dict:
        d, model = ctx.recipe.dense, ctx.loaded.model
        targets = dense_targets(model, ctx.loaded.adapter, d.targets)
        hessians = {}
        if d.method == "gptq":
            bar = tqdm(total=len(ctx.batches), desc="dense: calibration pass", disable=not ctx.progress)
            set_dequant_cache(model, True)  # one forward per batch: packed experts dequantized once
            try:
                with bar:
                    hessians = input_hessians(model, list(targets), ctx.batches, ctx.recipe.device, bar)
            finally:
                set_dequant_cache(model, False)
        untied = "lm_head" in targets.values() and untie_lm_head(model)
        fmt, params, nbytes, errors = d.format, 0, 0, {}
        for name in tqdm(targets, desc=f"dense: {d.method} {fmt.name}", disable=not ctx.progress):
            weight = model.get_submodule(name).weight
            packed = quantize_linear(weight, fmt, hessians.get(name), d.damp)
            errors.setdefault(targets[name], []).append(relative_error(weight, packed, hessians.get(name)))
            params, nbytes = params + weight.numel(), nbytes + packed.nbytes
            install_quantized_linear(model, name, fmt, packed, d.method if name in hessians else "rtn")
        return {
            "format": fmt.name,
            "method": d.method,
            "linears": {kind: len(v) for kind, v in sorted(errors.items())},
            "params": params,
            "bytes": nbytes,
            "bits_per_param": 8 * nbytes / max(params, 1),
            "mean_relative_output_error": {k: sum(v) / len(v) for k, v in sorted(errors.items())},
            "lm_head_untied": untied,
        }
