"""The compression pipeline: load -> calibration batches -> the stages of `stages.STAGES` -> pack -> save."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocation import CompressionPlan
from .calibration.batches import calibration_batches, load_tokenizer_or_processor, training_batches
from .evaluation.records import RUN_RECORD, RunRecord
from .io.outputs import claim_output
from .models import LoadedModel, load_model
from .quant.experts import ExpertQuantReport
from .recipe import Recipe
from .runtime.packed_experts import PackedLinear, set_dequant_cache
from .stages import STAGES, RunContext, plan_allocation

__all__ = ["CompressionReport", "CompressionResult", "calibration_batches", "compress", "load_tokenizer_or_processor",
           "plan_allocation", "set_dequant_cache", "training_batches"]

log = logging.getLogger(__name__)


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
    stage_seconds: dict = field(default_factory=dict)
    output: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CompressionResult:
    model: nn.Module
    loaded: LoadedModel
    report: CompressionReport


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
    quantized = recipe.quantization.method != "none"
    ctx = RunContext(loaded, recipe, [], Path(output) if output is not None else None, trust_remote_code, progress,
                     plan if quantized else None)
    if ctx.plan is not None and recipe.merge.method == "none":
        ctx.plan.check_fits(*ctx.moe_layers())  # before calibration: a plan for another model is refused at once
    ctx.batches = calibration_batches(loaded, recipe, trust_remote_code)
    seconds = {}
    for stage in STAGES:
        if not stage.enabled(recipe):
            continue
        began = time.perf_counter()
        result = stage.run(ctx)
        seconds[stage.name] = round(time.perf_counter() - began, 2)
        log.info("stage %s done in %.1f s", stage.name, seconds[stage.name])
        if result is not None:
            ctx.reports[stage.name] = result

    reports, plan = ctx.quant_reports, ctx.plan
    nbytes, params = expert_bytes(loaded.model)
    if not quantized:
        params = sum(p.numel() for v in loaded.adapter.moe_blocks(loaded.model) for p in v.experts.parameters())
        nbytes = params * torch.empty(0, dtype=getattr(torch, recipe.save_dtype)).element_size()
    min_tokens = recipe.quantization.rare_experts.min_tokens
    report = CompressionReport(
        model=loaded.source,
        recipe=recipe.name,
        seconds=0.0,
        calibration_tokens=sum(b.num_tokens for b in ctx.batches),
        expert_params=params,
        expert_bytes=nbytes,
        bits_per_expert_param=8 * nbytes / max(params, 1),
        code_bits_per_expert_param=plan.average_bits if plan else 8 * nbytes / max(params, 1),
        allocation=plan.method if plan else "none",
        experts_gptq=sum(r.method == "gptq" for r in reports),
        experts_rtn=sum(r.method == "rtn" for r in reports),
        rare_experts=[asdict(r) for r in reports if r.tokens < min_tokens],
        stage_seconds=seconds,
        **{name: ctx.reports.get(name) for name in ("recovery", "merge", "slim", "skip")},
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
        for stage in ("slim", "recovery"):  # only an interrupted job needs its training state
            shutil.rmtree(ctx.state_dir(stage), ignore_errors=True)
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
