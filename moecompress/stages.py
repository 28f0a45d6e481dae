"""Compression stages. Each is an object with a `name`, `enabled(recipe)` and `run(ctx) -> report dict | None`;
they share one `RunContext` (model, recipe, calibration batches, output, plan, results). `pipeline.compress`
runs `STAGES` in order, so a new stage is its math in its own package, a class here and its recipe section."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .allocation import CompressionPlan, allocate
from .allocation.allocate import avg_bits_for_bytes
from .allocation.profile import ErrorProfile
from .calibration.batches import activation_holding
from .calibration.data import CalibrationBatch
from .calibration.engine import ExpertObserver, Walk, collect_expert_stats, run_layerwise
from .errors import ModelLoadError, UnsupportedModelError
from .formats import QuantFormat
from .models import LoadedModel, MoEBlockView, get_adapter, load_model
from .models.base import ModelAdapter
from .models.streaming import parameter_count
from .quant.experts import ExpertQuantReport, quantize_block_experts, quantize_matrices
from .quant.methods import make_quantizer
from .recipe import Recipe
from .runtime.packed_experts import install_packed_experts, persistent_state, set_dequant_cache
from .storage.layer_store import LayerStore
from .training.distill import training_batches
from .training.memory import teacher_placement

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the stages of one `compress` run share. `plan`: the bits of every expert (given, or made by the
    allocation stage); `quant_reports`: one per quantized expert; `reports`: each stage's report by name."""

    loaded: LoadedModel
    recipe: Recipe
    batches: list[CalibrationBatch]
    output: Path | None = None
    trust_remote_code: bool = False
    progress: bool = True
    plan: CompressionPlan | None = None
    quant_reports: list[ExpertQuantReport] = field(default_factory=list)
    reports: dict[str, dict] = field(default_factory=dict)
    store: LayerStore | None = None  # a streamed run's finished layers (resumable); None: the model is in memory

    @property
    def cpu(self) -> bool:
        return self.recipe.device == "cpu"

    def state_dir(self, stage: str) -> Path | None:
        """Where a resumable stage keeps its state: `<output>.<stage>-state/` (none without an output)."""
        return Path(str(self.output.expanduser()) + f".{stage}-state") if self.output is not None else None

    def fingerprint(self) -> str:
        from .training.qat import job_fingerprint

        return job_fingerprint(self.recipe.to_yaml(), self.loaded.source)

    def spill_folder(self, stage: str) -> Path | None:
        """Where `stage` offloads calibration activations: the state folder's scratch (None: a temporary folder)."""
        return self.store.scratch(f"activations-{stage}") if self.store is not None else None

    def activations(self, stage: str):
        """How `stage` holds its calibration activations between layers (a context)."""
        return activation_holding(self.recipe.calibration, self.spill_folder(stage))

    def moe_layers(self) -> tuple[list[int], int]:
        views = self.loaded.adapter.moe_blocks(self.loaded.model)
        return [v.key for v in views], views[0].num_experts

    def layer_views(self) -> dict[int, list[MoEBlockView]]:
        """Each decoder layer's MoE blocks: one, or one per modality group."""
        views: dict[int, list[MoEBlockView]] = {}
        for view in self.loaded.adapter.moe_blocks(self.loaded.model):
            views.setdefault(view.layer_index, []).append(view)
        return views

    def resume_point(self) -> tuple[int, object] | None:
        """Where a streamed run stopped before (first layer to do, its inputs), or None."""
        resume = self.store.resume_point() if self.store is not None else None
        if resume is not None:
            log.info("resuming after layer %d from %s", resume[0] - 1, self.store.folder)
        return resume

    def store_layer(self, index: int, layer: torch.nn.Module, record: dict, hidden) -> None:
        """A streamed run's finished layer: its tensors as the checkpoint will hold them, with `record` (what a
        resumed run needs to rebuild it in the skeleton); nothing when the model is in memory."""
        if self.store is None:
            return
        prefix = f"{self.loaded.adapter.layers_prefix(self.loaded.model)}.{index}."
        state = persistent_state(layer, getattr(torch, self.recipe.save_dtype))
        self.store.save_layer(index, {prefix + k: v for k, v in state.items()}, record, hidden)

    def walk(self, stage: str, on_moe_layer, on_layer_done, resume, **options) -> None:
        """`run_layerwise` over the loaded model and the calibration batches for `stage`, each finished layer handed
        to `on_layer_done`, from `resume` on; `options`: the rest of the `Walk`."""
        with self.activations(stage) as holding:
            walk = Walk(
                self.recipe.device,
                progress=self.progress,
                layers_from=self.loaded,
                on_layer_done=on_layer_done,
                resume=resume,
                activations=holding,
                **options,
            )
            run_layerwise(self.loaded.model, self.loaded.adapter, self.batches, on_moe_layer, walk)


class Stage(Protocol):
    name: str

    def enabled(self, recipe: Recipe) -> bool: ...

    def run(self, ctx: RunContext) -> dict | None: ...


class MergeStage:
    """Sub-MoE / averaging / pruning: fewer routed experts per layer (`merge:`). Streamed, each merged layer is kept
    in float32 in `<output>.compress-state/scratch/merged/` for the quantization pass (a resumed run merges again: the
    merge is deterministic, and cheap next to GPTQ)."""

    name = "merge"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.merge.method != "none"

    def run(self, ctx: RunContext) -> dict:
        from .merge.apply import reduce_experts

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


class SlimStage:
    """Staged neuron slimming distilled from the source model (`slim:`); resumable from `<output>.slim-state/`."""

    name = "slim"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.slim.enabled

    def run(self, ctx: RunContext) -> dict:
        from .slim.staged import slim_experts

        r, loaded = ctx.recipe, ctx.loaded
        teacher = _distill_teacher(ctx, self.name) if r.slim.steps_per_stage else None
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


class FactorStage:
    """Factored experts (`factor:`): per MoE block an optional quantized shared base and quantized per-expert deltas
    (low-rank, dense or none), their forms, ranks and widths chosen under the byte budget (`merge/factor_layer.py`),
    layer by layer on the calibration data (each layer calibrated on the factored layers before it). It replaces
    the allocation and quantization stages. Streamed (`ctx.store`) as quantization is: each finished layer is
    stored with its layout, and a resumed run starts after the last stored layer."""

    name = "factor"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.factor.enabled

    def run(self, ctx: RunContext) -> dict:
        from .merge.factor_layer import (
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
        for index in store.done() if resume is not None else []:
            for view in views.get(index, []):
                record = store.record(index)["factored"][str(view.key)]
                restore_factored_experts(view, record["layout"])
                done[str(view.key)] = record["summary"]

        quantizer = make_quantizer(q)

        def factor_layer(view: MoEBlockView, observer: ExpertObserver) -> bool:
            def quantize(w: torch.Tensor, hessian: torch.Tensor, formats: list[QuantFormat]):
                where = [f"layer {view.key} (factored experts)"] * len(formats)
                return quantize_matrices([w] * len(formats), hessian, formats, quantizer, where)

            blocks[view.key] = factor_block(view, observer, f, q.format_for, quantize)
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
        )
        return {"avg_bits_budget": f.avg_bits, "base_bits": f.base_bits, "whiten": f.whiten, "blocks": done}


class AllocationStage:
    """The format of every expert projection: the given plan (checked against the model) or the allocator's."""

    name = "allocation"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.quantization.method != "none" and not recipe.factor.enabled

    def run(self, ctx: RunContext) -> None:
        saved = ctx.store.folder / "plan.json" if ctx.store is not None else None
        if ctx.plan is None and saved is not None and saved.is_file():
            ctx.plan = CompressionPlan.load(saved)  # a resumed run: the profiling pass was done before the kill
        if ctx.plan is None:
            ctx.plan, _ = plan_allocation(
                ctx.loaded, ctx.recipe, ctx.batches, ctx.progress, ctx.spill_folder(self.name)
            )
            if ctx.store is not None:
                ctx.store.save_json("plan.json", ctx.plan.to_dict())
        else:
            ctx.plan.check_fits(*ctx.moe_layers())


class QuantizeStage:
    """GPTQ / RTN / ternary of every routed expert, layer by layer, each block then replaced by packed experts.
    Streamed (`ctx.store`): each finished layer is written to the store as the checkpoint will hold it, and a
    resumed run starts after the last stored layer."""

    name = "quantize"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.quantization.method != "none" and not recipe.factor.enabled

    def run(self, ctx: RunContext) -> None:
        loaded, store = ctx.loaded, ctx.store
        quantizer = make_quantizer(ctx.recipe.quantization)
        views, resume = ctx.layer_views(), ctx.resume_point()
        reports: dict[int | str, list[ExpertQuantReport]] = {}  # by block key
        packed: dict[int | str, list] = {}
        for index in store.done() if resume is not None else []:
            reports.update(_restore_layer(views.get(index, []), store.record(index)))

        def quantize_layer(view: MoEBlockView, observer: ExpertObserver) -> bool:
            formats = ctx.plan.layer_formats(view.key)
            packed[view.key], reports[view.key] = quantize_block_experts(
                view, observer, formats, quantizer, loaded.trim
            )
            return True

        def layer_done(index: int, layer: torch.nn.Module, hidden: list[torch.Tensor]) -> None:
            blocks = views.get(index, [])
            for view in blocks:
                if view.key in packed:
                    install_packed_experts(view, packed.pop(view.key), [r.method for r in reports[view.key]])
            formats = {v.group: _format_dicts(ctx.plan.layer_formats(v.key)) for v in blocks}
            record = {
                "reports": [asdict(r) for v in blocks for r in reports.get(v.key, [])],
                "formats": formats.get(None, formats) if blocks else None,  # {group: ...} for grouped blocks
            }
            ctx.store_layer(index, layer, record, hidden)

        ctx.walk(self.name, quantize_layer, layer_done, resume, statistics=quantizer.statistics, desc="compress")
        ctx.quant_reports = [r for key in reports for r in reports[key]]  # restored layers, then the others, in order


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


class RecoveryStage:
    """Quantization-aware distillation of the packed experts (`recovery:`); resumable from `<output>.recovery-state/`."""

    name = "recovery"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.recovery.enabled

    def run(self, ctx: RunContext) -> dict:
        from .training.qat import recover_quantized_experts

        r, loaded = ctx.recipe, ctx.loaded
        teacher = _distill_teacher(ctx, self.name, r.recovery.teacher)
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


class SkipStage:
    """Fit a dynamic expert-skipping rule on the calibration data (`skip:`)."""

    name = "skip"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.skip.method != "none"

    def run(self, ctx: RunContext) -> dict:
        from .dynamic.skip import fit_skipping

        model = ctx.loaded.model
        set_dequant_cache(model, True)  # many calibration forwards; packed experts dequantized once
        try:
            return fit_skipping(
                model, ctx.loaded.adapter, ctx.batches, ctx.recipe.skip, ctx.progress, cpu=ctx.cpu
            ).rule.to_dict()
        finally:
            set_dequant_cache(model, False)


STAGES: tuple[Stage, ...] = (
    MergeStage(),
    SlimStage(),
    FactorStage(),
    AllocationStage(),
    QuantizeStage(),
    RecoveryStage(),
    SkipStage(),
)


def plan_allocation(
    loaded: LoadedModel,
    recipe: Recipe,
    batches: list[CalibrationBatch],
    progress: bool = True,
    spill_to: Path | None = None,
) -> tuple[CompressionPlan, object]:
    """Profile every expert's quantization error at the candidate bit widths, then allocate bits (activations
    offloaded, if the recipe says so, to `spill_to`). Returns (plan, ExpertStats)."""
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
            ),
        )
    return allocate(stats, a, integer_format), stats


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


def _distill_teacher(ctx: RunContext, stage: str, source: str | None = None) -> LoadedModel:
    """The teacher of a distillation stage in bfloat16: `source` (any causal LM) or the model being compressed. It
    stays whole on the device when it fits next to the optimizer states still to come, else accelerate offloads the
    layers that do not fit to `<output>.<stage>-state/teacher-offload/` (no second float32 copy of the model)."""
    expert_params = sum(v.expert_params for v in ctx.loaded.adapter.moe_blocks(ctx.loaded.model))
    folder = ctx.state_dir(stage) or Path(tempfile.gettempdir()) / f"moecompress-{os.getpid()}-{stage}"
    placement = teacher_placement(
        2 * parameter_count(source or ctx.loaded.source),
        12 * expert_params,
        folder / "teacher-offload",
        ctx.recipe.device,
    )
    if source is None:
        teacher = load_model(ctx.loaded.source, torch.bfloat16, trust_remote_code=ctx.trust_remote_code, **placement)
    else:
        teacher = _load_teacher(source, ctx.trust_remote_code, placement)
    if ctx.state_dir(stage) is None:  # no output, no state folder: the offloaded weights go with the teacher
        weakref.finalize(teacher.model, shutil.rmtree, folder, True)
    return teacher


def _load_teacher(source: str, trust_remote_code: bool, placement: dict) -> LoadedModel:
    """Any causal LM (dense or MoE) as a distillation teacher, in bfloat16."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.bfloat16, trust_remote_code=trust_remote_code, **placement
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the recovery teacher '{source}': {exc}") from exc
    try:
        adapter = get_adapter(model.config.model_type)
    except UnsupportedModelError:
        adapter = ModelAdapter()
    return LoadedModel(model.eval(), adapter, source)
