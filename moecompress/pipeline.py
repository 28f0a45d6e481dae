"""The compression pipeline: load -> calibrate layer by layer -> quantize experts -> pack -> save."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocation import CompressionPlan, allocate
from .allocation.allocate import avg_bits_for_bytes
from .calibration.data import CalibrationBatch, text_calibration_batches, vl_calibration_batches
from .calibration.engine import ExpertObserver, collect_expert_stats, run_layerwise
from .errors import CalibrationDataError, ModelLoadError, UnsupportedModelError
from .evaluation.records import RUN_RECORD, RunRecord
from .io.outputs import claim_output
from .models import LoadedModel, MoEBlockView, get_adapter, load_model
from .models.base import ModelAdapter
from .quant.experts import (
    ExpertQuantReport,
    GPTQOptions,
    RareExpertPolicy,
    install_packed_experts,
    quantize_block_experts,
)
from .quant.qtensor import QuantFormat
from .recipe import CalibrationConfig, Recipe
from .runtime.packed_experts import PackedExperts, PackedLinear
from .training.distill import DistillData


@dataclass
class CompressionReport:
    model: str
    recipe: str
    seconds: float
    calibration_tokens: int
    expert_params: int
    expert_bytes: int
    bits_per_expert_param: float
    code_bits_per_expert_param: float
    allocation: str
    experts_gptq: int
    experts_rtn: int
    rare_experts: list[dict] = field(default_factory=list)
    recovery: dict | None = None
    merge: dict | None = None
    slim: dict | None = None
    skip: dict | None = None
    output: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressionResult:
    model: nn.Module
    loaded: LoadedModel
    report: CompressionReport


def load_tokenizer_or_processor(source: str, multimodal: bool, trust_remote_code: bool = False):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        if multimodal:
            return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as exc:
        hint = " This processor ships custom code: pass --trust-remote-code." if multimodal and not trust_remote_code else ""
        raise ModelLoadError(f"could not load the tokenizer/processor of '{source}': {exc}.{hint}") from exc


def calibration_batches(loaded: LoadedModel, recipe: Recipe, trust_remote_code: bool = False) -> list[CalibrationBatch]:
    cal = recipe.calibration
    processor = load_tokenizer_or_processor(loaded.source, loaded.adapter.is_multimodal, trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = text_calibration_batches(cal.dataset, tokenizer, cal.num_samples, cal.seq_len, cal.batch_size, cal.seed)
    if loaded.adapter.is_multimodal:
        if not cal.vl_dataset:
            raise CalibrationDataError(
                f"'{loaded.source}' is a vision-language model: set calibration.vl_dataset to an image+text jsonl "
                "so that image tokens are calibrated too."
            )
        batches += vl_calibration_batches(
            cal.vl_dataset, processor, loaded.model.config.image_token_id, cal.vl_num_samples, cal.seed
        )
    return batches


def expert_bytes(model: nn.Module) -> tuple[int, int]:
    """(packed bytes incl. scales/zeros, expert parameters) over all `PackedExperts`."""
    nbytes = params = 0
    for module in model.modules():
        if isinstance(module, PackedLinear):
            nbytes += module.packed().nbytes
            params += module.out_features * module.in_features
    return nbytes, params


def _as_recipe(recipe: Recipe | str | Path | None) -> Recipe:
    if recipe is None:
        return Recipe()
    return recipe if isinstance(recipe, Recipe) else Recipe.from_yaml(recipe)


def plan_allocation(
    loaded: LoadedModel, recipe: Recipe, batches: list[CalibrationBatch], progress: bool = True
) -> tuple[CompressionPlan, object]:
    """Profile every expert's quantization error at the candidate bit widths, then allocate bits.
    Returns (plan, ExpertStats)."""
    q, a = recipe.quantization, recipe.allocation
    views = loaded.adapter.moe_blocks(loaded.model)
    if a.method == "uniform":
        return CompressionPlan.uniform([v.layer_index for v in views], views[0].num_experts, q.format), None
    formats = [q.format_for(k) for k in a.profile_keys]
    integer_format = QuantFormat(q.bits, q.group_size, q.sym)
    if a.max_bytes is not None:
        a.avg_bits = avg_bits_for_bytes(a.max_bytes, *_unquantized_bytes_and_expert_params(loaded, recipe),
                                        [q.format_for(k) for k in a.candidates], integer_format)
    stats = collect_expert_stats(loaded.model, loaded.adapter, batches, loaded.source, measure_drop_loss=False,
                                 device=recipe.device, progress=progress, profile_formats=formats,
                                 profile_max_tokens=a.profile_tokens)
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


def compress(
    model: str | LoadedModel,
    recipe: Recipe | str | Path | None = None,
    output: str | Path | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    plan: CompressionPlan | str | Path | None = None,
    overwrite: bool = False,
) -> CompressionResult:
    """Compress the routed experts of `model` (folder, hub id or `LoadedModel`) as `recipe` says (or at the
    bits of a precomputed `plan`); save the packed checkpoint to `output` if given: a new path, or with
    `overwrite` an earlier moecompress output. The output is checked and locked before any work starts."""
    recipe = _as_recipe(recipe)
    if plan is not None and not isinstance(plan, CompressionPlan):
        plan = CompressionPlan.load(plan)
    source = model.source if isinstance(model, LoadedModel) else model
    with claim_output(output, [source], overwrite) if output is not None else contextlib.nullcontext():
        return _compress(model, recipe, output, trust_remote_code, progress, plan, overwrite)


def _compress(model, recipe: Recipe, output, trust_remote_code: bool, progress: bool, plan: CompressionPlan | None,
              overwrite: bool) -> CompressionResult:
    start = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_remote_code=trust_remote_code)
    if plan is not None and recipe.merge.method == "none":
        views = loaded.adapter.moe_blocks(loaded.model)
        plan.check_fits([v.layer_index for v in views], views[0].num_experts)
    batches = calibration_batches(loaded, recipe, trust_remote_code)
    reductions = []
    if recipe.merge.method != "none":
        from .merge.apply import reduce_experts

        reductions = reduce_experts(loaded, batches, recipe.merge, recipe.device, progress)
    slim = slim_stage(loaded, recipe, batches, output, trust_remote_code, progress).to_dict() if recipe.slim.enabled else None
    if recipe.quantization.method == "none":
        plan = None
    elif plan is None:
        plan, _ = plan_allocation(loaded, recipe, batches, progress)
    else:
        views = loaded.adapter.moe_blocks(loaded.model)
        plan.check_fits([v.layer_index for v in views], views[0].num_experts)
    q = recipe.quantization
    gptq = GPTQOptions(damp=q.damp, act_order=q.act_order, clip_search=q.clip_search, ternary_scale=q.ternary_scale)
    rare = RareExpertPolicy(q.rare_experts.policy, q.rare_experts.min_tokens)
    results: dict[int, tuple[list, list[ExpertQuantReport]]] = {}

    def quantize_layer(view: MoEBlockView, observer: ExpertObserver) -> bool:
        results[view.layer_index] = quantize_block_experts(view, observer, plan.layer_formats(view.layer_index), q.method, gptq, rare)
        return True

    if q.method != "none":
        run_layerwise(loaded.model, loaded.adapter, batches, quantize_layer, recipe.device, progress=progress, desc="compress")
        for view in loaded.adapter.moe_blocks(loaded.model):
            install_packed_experts(view, *results[view.layer_index])

    recovery = None
    if recipe.recovery.enabled:
        recovery = recover(loaded, recipe, output, trust_remote_code, progress).to_dict()
    skip = None
    if recipe.skip.method != "none":
        from .dynamic.skip import fit_skipping

        set_dequant_cache(loaded.model, True)  # many calibration forwards; packed experts dequantized once
        try:
            skip = fit_skipping(loaded.model, loaded.adapter, batches, recipe.skip, progress, cpu=recipe.device == "cpu").rule.to_dict()
        finally:
            set_dequant_cache(loaded.model, False)
    reports = [r for _, layer_reports in results.values() for r in layer_reports]
    nbytes, params = expert_bytes(loaded.model)
    if q.method == "none":
        params = sum(p.numel() for v in loaded.adapter.moe_blocks(loaded.model) for p in v.experts.parameters())
        nbytes = params * torch.empty(0, dtype=getattr(torch, recipe.save_dtype)).element_size()
    report = CompressionReport(
        model=loaded.source,
        recipe=recipe.name,
        seconds=0.0,
        calibration_tokens=sum(b.num_tokens for b in batches),
        expert_params=params,
        expert_bytes=nbytes,
        bits_per_expert_param=8 * nbytes / max(params, 1),
        code_bits_per_expert_param=plan.average_bits if plan else 8 * nbytes / max(params, 1),
        allocation=plan.method if plan else "none",
        experts_gptq=sum(r.method == "gptq" for r in reports),
        experts_rtn=sum(r.method == "rtn" for r in reports),
        rare_experts=[asdict(r) for r in reports if r.tokens < rare.min_tokens],
        recovery=recovery,
        merge={"method": recipe.merge.method, "router": recipe.merge.router,
               "experts_per_layer": [r.kept for r in reductions],
               "prune_errors": [r.error for r in reductions if r.error is not None]} if reductions else None,
        slim=slim,
        skip=skip,
    )
    if output is not None:
        from .io.checkpoint import save_checkpoint

        report.seconds = time.perf_counter() - start
        report.output = str(save_checkpoint(
            loaded.model, output, recipe.to_yaml(), loaded.source, report.to_dict(), getattr(torch, recipe.save_dtype),
            extra_files={RUN_RECORD: json.dumps(run_record(report, recipe, plan, reports, Path(output)).to_dict(), indent=1),
                         **({"plan.json": json.dumps(plan.to_dict(), indent=1)} if plan else {})},
            overwrite=overwrite,
        ))
        for state in (".slim-state", ".recovery-state"):  # only an interrupted job needs its training state
            shutil.rmtree(str(Path(output).expanduser()) + state, ignore_errors=True)
    report.seconds = time.perf_counter() - start
    return CompressionResult(loaded.model, loaded, report)


def run_record(report: CompressionReport, recipe: Recipe, plan: CompressionPlan | None,
               reports: list[ExpertQuantReport], output: Path) -> RunRecord:
    """The record `moecompress report` and the model card read: what was done, bits per expert, routing shares."""
    if plan is None:
        method = "bf16 experts" if recipe.quantization.method == "none" else recipe.quantization.method
    elif len(plan.formats) == 1:
        method = f"{recipe.quantization.method} {plan.formats[0].name}"
    else:
        method = f"{recipe.quantization.method} mixed {plan.method} ({plan.average_bits:.2f} bits)"
    stages = [name for name, done in (("merge", report.merge), ("slim", report.slim), ("recovery", report.recovery),
                                      ("skip", report.skip)) if done]
    record = RunRecord(name=output.name, model=str(output.expanduser().resolve()), base_model=report.model,
                       recipe=recipe.name, method=" + ".join([method, *stages]),
                       expert_bits_per_param=report.bits_per_expert_param,
                       compression={**report.to_dict(), "rare_experts": len(report.rare_experts)})
    if plan is not None:
        record.bit_allocation = {"layers": plan.layers, "values": plan.bits.mean(dim=2).tolist()}
    if reports:
        layers = sorted({r.layer for r in reports})
        tokens = torch.zeros(len(layers), max(r.expert for r in reports) + 1)
        for r in reports:
            tokens[layers.index(r.layer), r.expert] = r.tokens
        record.importance = {"layers": layers, "metric": "share of the layer's calibration routings",
                             "values": (tokens / tokens.sum(1, keepdim=True).clamp(min=1)).tolist()}
    return record


def training_batches(loaded: LoadedModel, r: DistillData, cal: CalibrationConfig, trust_remote_code: bool = False) -> list[CalibrationBatch]:
    """Training data of a distillation stage: text windows (+ image+text items for VL models), shuffled together."""
    processor = load_tokenizer_or_processor(loaded.source, loaded.adapter.is_multimodal, trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = text_calibration_batches(r.dataset or cal.dataset, tokenizer, r.num_samples, r.seq_len, r.batch_size, r.seed)
    if loaded.adapter.is_multimodal and cal.vl_dataset and r.vl_num_samples:
        batches += vl_calibration_batches(cal.vl_dataset, processor, loaded.model.config.image_token_id, r.vl_num_samples, r.seed)
    random.Random(r.seed).shuffle(batches)
    return batches


def slim_stage(loaded: LoadedModel, recipe: Recipe, batches: list[CalibrationBatch], output: str | Path | None = None,
               trust_remote_code: bool = False, progress: bool = True):
    """Staged neuron slimming of the routed experts of `loaded.model`, distilled from the source model.
    Resumable when `output` is given: the state lives in `<output>.slim-state/`."""
    from .slim.staged import slim_experts
    from .training.qat import job_fingerprint

    teacher = load_model(loaded.source, trust_remote_code=trust_remote_code) if recipe.slim.steps_per_stage else None
    state_dir = Path(str(Path(output).expanduser()) + ".slim-state") if output is not None else None
    return slim_experts(
        loaded.model, loaded.adapter, teacher.model if teacher else None, batches,
        training_batches(loaded, recipe.slim, recipe.calibration, trust_remote_code) if teacher else [], recipe.slim, state_dir,
        job_fingerprint(recipe.to_yaml(), loaded.source), progress, cpu=recipe.device == "cpu",
    )


def _load_teacher(source: str, trust_remote_code: bool) -> LoadedModel:
    """Any causal LM (dense or MoE) as a distillation teacher."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the recovery teacher '{source}': {exc}") from exc
    config = model.config
    try:
        adapter = get_adapter(config.model_type)
    except UnsupportedModelError:
        adapter = ModelAdapter()
    return LoadedModel(model.eval(), adapter, source)


def recover(
    loaded: LoadedModel, recipe: Recipe, output: str | Path | None = None, trust_remote_code: bool = False,
    progress: bool = True,
):
    """Quantization-aware distillation of the packed experts of `loaded.model` from the original model.
    Resumable when `output` is given: the state lives in `<output>.recovery-state/`."""
    from .training.qat import job_fingerprint, recover_quantized_experts

    teacher = _load_teacher(recipe.recovery.teacher, trust_remote_code) if recipe.recovery.teacher else \
        load_model(loaded.source, trust_remote_code=trust_remote_code)
    state_dir = Path(str(Path(output).expanduser()) + ".recovery-state") if output is not None else None
    report = recover_quantized_experts(
        loaded.model, teacher.model, loaded.adapter, training_batches(loaded, recipe.recovery, recipe.calibration, trust_remote_code), recipe.recovery,
        state_dir, job_fingerprint(recipe.to_yaml(), loaded.source), progress, cpu=recipe.device == "cpu",
    )
    loaded.model.eval()
    del teacher
    return report


def set_dequant_cache(model: nn.Module, enabled: bool) -> None:
    """Keep dequantized expert weights between forwards (faster CPU evaluation, full-precision memory)."""
    for module in model.modules():
        if isinstance(module, PackedExperts):
            module.set_cache_dequantized(enabled)
