"""Bits per expert (`allocation:`) and the quantization of every routed expert (`quantization:`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..allocation import CompressionPlan, allocate
from ..allocation.allocate import POOLED, AllocationConfig, avg_bits_for_bytes
from ..allocation.profile import ErrorProfile
from ..calibration.batches import activation_holding
from ..calibration.data import CalibrationBatch
from ..calibration.engine import ExpertObserver, Walk, collect_expert_stats
from ..distributed import Ranks
from ..errors import RecipeError
from ..formats import FORMATS, TERNARY_SCALE_METHODS, IntFormat, QuantFormat, ternary_packings
from ..models import LoadedModel, MoEBlockView
from ..quant.config import RARE_POLICIES, QuantizationConfig
from ..quant.experts import ExpertQuantReport, quantize_block_experts
from ..quant.methods import QUANTIZERS, make_quantizer
from ..runtime.packed_experts import install_packed_experts
from .base import RunContext, Stage, register_stage

if TYPE_CHECKING:
    from ..recipe import Recipe


@register_stage
class AllocationStage(Stage):
    """The format of every expert projection: the given plan (checked against the model) or the allocator's."""

    name = "allocation"
    order = 40
    section, config = "allocation", AllocationConfig
    streams = splits = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.quantization.method != "none" and not recipe.factor.enabled

    def validate(self, recipe: Recipe) -> None:
        q = recipe.quantization
        a = recipe.allocation.validate()
        fmt = q.format_for(q.bits)
        if a.method != "uniform":
            try:
                candidates = [q.format_for(k) for k in a.candidates]
            except ValueError as exc:
                recipe.fail(f"allocation.candidates {a.candidates}: {exc}")
            a.check_budget(candidates, fmt)
        if "gguf" in fmt.exports and a.method != "uniform" and a.granularity not in POOLED:
            recipe.fail(
                f"allocation.granularity {a.granularity}: llama.cpp stores a layer's experts as one tensor of one "
                f"type, so {fmt.name} experts take one type per layer; use granularity layer or layer-projection"
            )

    def check_memory(self, ctx: RunContext) -> None:
        if ctx.plan is None and ctx.recipe.allocation.method != "uniform":
            ctx.memory_plan(self.name, frozenset(), chunks=True, announce=False)

    def run(self, ctx: RunContext) -> None:
        saved = None
        if ctx.plan is None:  # every rank gets rank 0's (it holds the store)
            saved = ctx.ranks.from_first(ctx.store.load_json("plan.json") if ctx.store is not None else None)
        if saved is not None:  # a resumed run: the profiling pass was done before the kill
            ctx.plan = CompressionPlan.from_dict(saved, ctx.store.folder / "plan.json" if ctx.store else "plan")
        if ctx.plan is None:
            ctx.plan, _ = plan_allocation(
                ctx.loaded,
                ctx.recipe,
                ctx.batches,
                ctx.progress,
                ctx.spill_folder(self.name),
                ctx.memory_plan(self.name, frozenset(), chunks=True)
                if ctx.recipe.allocation.method != "uniform"
                else None,
                ctx.ranks,
            )
            if ctx.store is not None:
                ctx.store.save_json("plan.json", ctx.plan.to_dict())
        else:
            ctx.plan.check_fits(*ctx.moe_layers())


@register_stage
class QuantizeStage(Stage):
    """GPTQ / RTN / ternary of every routed expert, layer by layer, each block then replaced by packed experts.
    Streamed (`ctx.store`): each finished layer is written to the store as the checkpoint will hold it, and a
    resumed run starts after the last stored layer."""

    name = "quantize"
    order = 50
    section, config = "quantization", QuantizationConfig
    streams = splits = validated_first = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.quantization.method != "none" and not recipe.factor.enabled

    def validate(self, recipe: Recipe) -> None:
        q = recipe.quantization
        checks = [
            (
                q.method in (*QUANTIZERS, "none"),
                f"quantization.method '{q.method}': use one of {[*QUANTIZERS, 'none']}",
            ),
            (
                q.bits in FORMATS.get(q.packed_format, IntFormat).widths(),
                f"quantization.bits {q.bits}: use one of {list(FORMATS.get(q.packed_format, IntFormat).widths())}",
            ),
            (
                q.group_size >= -1 and (q.group_size != 0 or q.ternary),
                f"quantization.group_size {q.group_size}: use a positive size or -1 (0, per tensor, only with ternary)",
            ),
            (
                q.ternary_packing in ternary_packings(),
                f"quantization.ternary_packing '{q.ternary_packing}': use one of {ternary_packings()}",
            ),
            (
                q.packed_format in FORMATS and FORMATS[q.packed_format].key_name is None,
                f"quantization.packed_format '{q.packed_format}': use one of "
                f"{[n for n, c in FORMATS.items() if not c.key_name]}",
            ),
            (
                q.ternary_scale in TERNARY_SCALE_METHODS,
                f"quantization.ternary_scale '{q.ternary_scale}': use one of {list(TERNARY_SCALE_METHODS)}",
            ),
            (
                0 < q.damp < 1,
                f"quantization.damp {q.damp}: use a fraction of the mean Hessian diagonal in (0, 1), e.g. 0.01",
            ),
            (
                q.rare_experts.policy in RARE_POLICIES,
                f"quantization.rare_experts.policy '{q.rare_experts.policy}': use one of {list(RARE_POLICIES)}",
            ),
            (
                q.rare_experts.min_tokens >= 0,
                f"quantization.rare_experts.min_tokens {q.rare_experts.min_tokens}: use 0 or more",
            ),
        ]
        for ok, message in checks:
            if not ok:
                recipe.fail(message)
        try:
            q.format_for(q.bits)
        except ValueError as exc:
            recipe.fail(f"quantization.packed_format '{q.packed_format}': {exc}")

    def check_memory(self, ctx: RunContext) -> None:
        _check_rows(ctx)
        ctx.memory_plan(self.name, make_quantizer(ctx.recipe.quantization).statistics, chunks=True, announce=False)

    def run(self, ctx: RunContext) -> None:
        loaded, store = ctx.loaded, ctx.store
        quantizer = make_quantizer(ctx.recipe.quantization)
        views, resume = ctx.layer_views(), ctx.resume_point()
        reports: dict[int | str, list[ExpertQuantReport]] = {}  # by block key
        packed: dict[int | str, list] = {}
        for index in store.done() if resume is not None and store is not None else []:
            reports.update(_restore_layer(views.get(index, []), store.record(index)))

        def quantize_layer(view: MoEBlockView, observer: ExpertObserver) -> bool:  # all experts, or a chunk
            formats = ctx.plan.layer_formats(view.key)
            chunk, done = quantize_block_experts(view, observer, formats, quantizer, loaded.trim)
            reports.setdefault(view.key, []).extend(done)
            if len(view.held) < view.num_experts:  # a chunk of a streamed layer: stored now, not held to the end
                ctx.store_experts(view, chunk)
            else:
                packed.setdefault(view.key, []).extend(chunk)
            return True

        def layer_done(index: int, layer: torch.nn.Module, hidden: list[torch.Tensor]) -> None:
            blocks = views.get(index, [])
            for view in blocks:
                if ctx.ranks.multi:  # every rank's experts, in expert order
                    shares = ctx.ranks.gathered(reports.get(view.key, []))
                    reports[view.key] = sorted((r for share in shares for r in share), key=lambda r: r.expert)
                methods = [r.method for r in reports.get(view.key, [])]
                if view.key in packed:
                    install_packed_experts(view, packed.pop(view.key), methods)
                elif index in ctx.stored_apart:  # stored chunk by chunk: the skeleton gets them on meta
                    install_packed_experts(view, None, methods, ctx.plan.layer_formats(view.key))
            formats = {v.group: _format_dicts(ctx.plan.layer_formats(v.key)) for v in blocks}
            record = {
                "reports": [asdict(r) for v in blocks for r in reports.get(v.key, [])],
                "formats": formats.get(None, formats) if blocks else None,  # {group: ...} for grouped blocks
            }
            ctx.store_layer(index, layer, record, hidden)

        chunks = ctx.memory_plan(self.name, quantizer.statistics, chunks=True)
        ctx.walk(
            self.name,
            quantize_layer,
            layer_done,
            resume,
            statistics=quantizer.statistics,
            desc="compress",
            chunks=chunks,
        )
        ctx.quant_reports = [r for key in reports for r in reports[key]]  # restored layers, then the others, in order


def _check_rows(ctx: RunContext) -> None:
    """Before anything runs: every format the recipe can give an expert holds its matrices (llama.cpp's types store
    rows in whole blocks of 32 or 256 weights)."""
    q, a = ctx.recipe.quantization, ctx.recipe.allocation
    formats = {q.format_for(k) for k in (q.bits, *(a.candidates if a.method != "uniform" else ()))}
    for view in [v for views in ctx.layer_views().values() for v in views]:
        hidden, inner = view.hidden_size, view.intermediate_size
        for fmt in formats:
            try:
                fmt.stored_shapes(inner, hidden), fmt.stored_shapes(hidden, inner)
            except ValueError as exc:
                raise RecipeError(f"layer {view.key}'s experts ({inner} x {hidden}) as {fmt.name}: {exc}.") from None


def _format_dicts(formats: list[dict[str, QuantFormat]]) -> list[dict[str, dict]]:
    return [{p: f.to_dict() for p, f in e.items()} for e in formats]


def _restore_layer(blocks: list[MoEBlockView], record: dict) -> dict[int | str, list[ExpertQuantReport]]:
    """A layer finished by an earlier run: its quantization reports by block key, and meta packed experts in the
    skeleton (for the checkpoint's config and manifest; the tensors themselves are in the store)."""
    reports: dict[int | str, list[ExpertQuantReport]] = {}
    for r in record["reports"]:
        reports.setdefault(r["layer"], []).append(ExpertQuantReport(**r))
    for view in blocks if record["formats"] is not None else []:
        stored = record["formats"] if view.group is None else record["formats"][view.group]
        formats = [{p: QuantFormat.from_dict(f) for p, f in e.items()} for e in stored]
        install_packed_experts(view, None, [r.method for r in reports.get(view.key, [])], formats)
    return reports


def plan_allocation(
    loaded: LoadedModel,
    recipe: Recipe,
    batches: list[CalibrationBatch],
    progress: bool = True,
    spill_to: Path | None = None,
    chunks: dict[int, int] | None = None,
    ranks: Ranks = Ranks(),
) -> tuple[CompressionPlan, object]:
    """Profile every expert's quantization error at the candidate bit widths, then allocate bits (activations
    offloaded, if the recipe says so, to `spill_to`; `chunks`: the experts profiled at a time per layer that does not
    fit at once; `ranks`: an expert-parallel job's, each profiling its share, rank 0 allocating). Returns (plan,
    ExpertStats)."""
    q, a = recipe.quantization, recipe.allocation
    views = loaded.adapter.moe_blocks(loaded.model)
    if a.method == "uniform":
        return CompressionPlan.uniform([v.key for v in views], views[0].num_experts, q.format), None
    formats = [q.format_for(k) for k in a.profile_keys]
    integer_format = q.format_for(q.bits)
    if a.max_bytes is not None:
        a.avg_bits = avg_bits_for_bytes(
            a.max_bytes,
            *_unquantized_bytes_and_expert_params(loaded, recipe),
            [q.format_for(k) for k in a.candidates],
            integer_format,
        )
    with activation_holding(recipe.calibration, spill_to) as holding:
        stats = collect_expert_stats(
            loaded.model,
            loaded.adapter,
            batches,
            loaded.source,
            measure_drop_loss=False,
            walk=Walk(
                recipe.device,
                progress=progress,
                desc="analyze",
                collectors=lambda view: [ErrorProfile(view, formats, a.profile_tokens)],
                layers_from=loaded,
                activations=holding,
                chunks=chunks,
                ranks=ranks,
            ),
        )
    plan = allocate(stats, a, integer_format) if ranks.first else None  # the integer program: rank 0 solves it
    if ranks.multi:
        shared = ranks.from_first(plan.to_dict() if plan is not None else None)
        plan = plan if ranks.first else CompressionPlan.from_dict(shared)
    return plan, stats


def _unquantized_bytes_and_expert_params(loaded: LoadedModel, recipe: Recipe) -> tuple[int, int]:
    """Checkpoint bytes of everything but the routed experts (tied tensors once), and the expert parameter count."""
    expert_tensors = {id(p) for v in loaded.adapter.moe_blocks(loaded.model) for p in v.experts.parameters()}
    element = torch.empty(0, dtype=getattr(torch, recipe.save_dtype)).element_size()
    seen, fixed, experts = set(), 0, 0
    for tensor in list(loaded.model.parameters()) + list(loaded.model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in expert_tensors:
            experts += tensor.numel()
        else:
            fixed += tensor.numel() * (element if tensor.is_floating_point() else tensor.element_size())
    return fixed, experts
