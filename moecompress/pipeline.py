"""The compression pipeline: load -> calibration batches -> the stages of `stages.STAGES` -> pack -> save."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .allocation import CompressionPlan
from .calibration.batches import calibration_batches, load_tokenizer_or_processor
from .calibration.data import CalibrationBatch
from .distributed import Ranks, join
from .errors import MoECompressError, RecipeError
from .evaluation.records import RUN_RECORD, RunRecord
from .models import LoadedModel, load_model
from .models.streaming import StreamedModel, local_folder, open_streamed, parameter_count
from .quant.experts import ExpertQuantReport
from .recipe import Recipe
from .runtime.factored_experts import FactoredExperts
from .runtime.packed_experts import PackedExperts, PackedLinear, set_dequant_cache
from .stages import STAGES, RunContext, plan_allocation
from .storage.layer_store import LayerStore, state_folder
from .storage.outputs import claim_output, disk_errors
from .training.distill import training_batches
from .training.memory import TrainingMemory, require_room

__all__ = [
    "CompressionReport",
    "CompressionResult",
    "calibration_batches",
    "compress",
    "load_tokenizer_or_processor",
    "plan_allocation",
    "set_dequant_cache",
    "training_batches",
]

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
    experts_by_method: dict[str, int]  # experts rounded by each quantizer (rare experts may fall back to rtn)
    rare_experts: list[dict] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)  # each stage's report, by stage name
    stage_seconds: dict = field(default_factory=dict)
    engine: str = "in-memory"  # or "streamed": layers read from disk one at a time, written as finished
    memory: dict | None = None  # a streamed run's memory plan: budget, experts per chunk per layer, estimated peaks
    output: str | None = None

    def to_dict(self) -> dict:
        """The fields, each stage's report as a key of its own (run.json's `compression`)."""
        d = asdict(self)
        return {**d.pop("stages"), **d}

    def __getattr__(self, name: str):  # a stage's report: `report.recovery`, `report.skip`, ...
        if name != "stages" and any(s.name == name for s in STAGES):
            return self.stages.get(name)
        raise AttributeError(f"CompressionReport has no field {name!r}")


@dataclass
class CompressionResult:
    """The compressed model and the report. After a streamed run `model` is read back from the written checkpoint
    on first use (the run itself never held the whole model)."""

    loaded: LoadedModel
    report: CompressionReport
    _model: nn.Module | None = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            if not isinstance(self.loaded, StreamedModel):
                self._model = self.loaded.model
            else:
                from .io.loader import load

                self._model = load(self.report.output, verify=False)
        return self._model


def expert_bytes(model: nn.Module) -> tuple[int, int]:
    """(packed bytes incl. scales/zeros, expert parameters) over all `PackedExperts` and `FactoredExperts` (whose
    parameters are those of the dense experts they stand for)."""
    blocks = [m for m in model.modules() if isinstance(m, (PackedExperts, FactoredExperts))]
    linears = [m for b in blocks for m in b.modules() if isinstance(m, PackedLinear)]
    params = sum(3 * b.num_experts * b.hidden_size * b.intermediate_size for b in blocks)
    return sum(m.packed().nbytes for m in linears), params


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
    stream: bool = True,
    max_shard_bytes: int = 5 * 10**9,
    ranks: Ranks | None = None,
) -> CompressionResult:
    """Compress the routed experts of `model` (folder, hub id or `LoadedModel`) as `recipe` says (or at the
    bits of a precomputed `plan`); save the packed checkpoint to `output` if given: a new path, or with
    `overwrite` an earlier moecompress output. The output is checked and locked before any work starts.

    stream: read one decoder layer at a time from the source's safetensors and write each finished layer to
    `<output>.compress-state/` at once, so memory stays at about one layer and a killed run resumes where it
    stopped (only when every enabled stage is layer-wise: merging, allocation, quantization, factoring; slimming,
    recovery and skipping work on the whole model in memory). The result is bit-identical either way.

    ranks: an expert-parallel job's (default: the job torchrun or accelerate launched this process in, else one rank):
    each rank works on its share of every layer's experts, rank 0 writes (`moecompress.distributed`). The tensors
    written are those of one rank."""
    recipe = _as_recipe(recipe)
    if plan is not None and recipe.factor.enabled:
        raise RecipeError(
            f"recipe '{recipe.name}' factors its experts and allocates their ranks and bits itself; drop --plan."
        )
    if plan is not None and not isinstance(plan, CompressionPlan):
        plan = CompressionPlan.load(plan)
    source = model.source if isinstance(model, LoadedModel) else model
    ranks = ranks or join(recipe.device)
    streams = isinstance(model, str) and stream and output is not None and not whole_model_stages(recipe)
    if ranks.multi:
        _check_splits(recipe, ranks, streams)
    claim = output is not None and ranks.first  # rank 0 writes; the other ranks only compute
    with claim_output(output, [source], overwrite) if claim else contextlib.nullcontext():
        if streams:
            loaded = open_streamed(model, trust_remote_code=trust_remote_code)
        else:
            if isinstance(model, str):
                _state_memory_need(model, recipe, trust_remote_code, stream and output is not None)
            loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_remote_code=trust_remote_code)
        return _compress(loaded, recipe, output, trust_remote_code, progress, plan, overwrite, max_shard_bytes, ranks)


def _state_memory_need(source: str, recipe: Recipe, trust_remote_code: bool, could_stream: bool) -> None:
    """Before the whole model is loaded: say why and how much memory it takes; refuse when training cannot fit."""
    stages = whole_model_stages(recipe)
    training = [s for s in STAGES if s.enabled(recipe) and s.trains]
    params = parameter_count(source)
    if training and params:
        skeleton = open_streamed(source, trust_remote_code=trust_remote_code, check_outside=False)
        experts = sum(v.expert_params for v in skeleton.adapter.moe_blocks(skeleton.model))
        teacher = max(parameter_count(s.teacher(recipe)) if s.teacher(recipe) else params for s in training)
        require_room(TrainingMemory(params, experts, teacher), [s.name for s in training], recipe.device)
    elif could_stream and params:
        log.warning(
            "stages %s work on the whole model: loading it in memory (float32: about %.1f GB)",
            ", ".join(stages),
            4 * params / 1e9,
        )


def _check_splits(recipe: Recipe, ranks: Ranks, streams: bool) -> None:
    """Refuse, in one line, a job that cannot be split over expert-parallel ranks."""
    alone = [s.name for s in STAGES if s.enabled(recipe) and not s.splits]
    if alone or not streams:
        why = f"stages {', '.join(alone)} run on one rank" if alone else "only a streamed run is split"
        raise RecipeError(
            f"{ranks.size} ranks split the experts of a streamed quantization run ({why}); run this job on one rank."
        )


def whole_model_stages(recipe: Recipe) -> list[str]:
    """The enabled stages that cannot stream (they train or evaluate the whole model); without quantization there
    is nothing layer-wise to stream either."""
    if recipe.quantization.method == "none":
        return ["save"]
    return [s.name for s in STAGES if s.enabled(recipe) and not s.streams]


def _compress(
    loaded: LoadedModel,
    recipe: Recipe,
    output,
    trust_remote_code: bool,
    progress: bool,
    plan: CompressionPlan | None,
    overwrite: bool,
    max_shard_bytes: int,
    ranks: Ranks = Ranks(),
) -> CompressionResult:
    start = time.perf_counter()
    quantized = recipe.quantization.method != "none"
    streamed = isinstance(loaded, StreamedModel)
    ctx = RunContext(
        loaded,
        recipe,
        [],
        Path(output) if output is not None else None,
        trust_remote_code,
        progress,
        plan if quantized else None,
        ranks=ranks,
    )
    if ctx.plan is not None and recipe.merge.method == "none":
        ctx.plan.check_fits(*ctx.moe_layers())  # before calibration: a plan for another model is refused at once
    ctx.batches = calibration_batches(loaded, recipe.calibration, trust_remote_code)
    if streamed and output is not None and ranks.first:
        ctx.store = LayerStore(state_folder(output), job_fingerprint(loaded, recipe, ctx.plan, ctx.batches))
    try:
        seconds = _run_stages(ctx)
    except BaseException as exc:
        if ctx.store is not None:
            _keep_resumable(ctx.store, exc)
        raise

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
        experts_by_method=dict(Counter(r.method for r in reports)),
        rare_experts=[asdict(r) for r in reports if r.tokens < min_tokens],
        stage_seconds=seconds,
        engine="streamed" if streamed else "in-memory",
        memory=ctx.memory.to_dict() if ctx.memory is not None else None,
        stages=dict(ctx.reports),
    )
    if output is not None and ranks.first:
        try:
            _write_checkpoint(ctx, report, Path(output), overwrite, max_shard_bytes, start)
        except BaseException as exc:
            if ctx.store is not None:
                _keep_resumable(ctx.store, exc)
            raise
    report.seconds = time.perf_counter() - start
    return CompressionResult(loaded, report)


def _write_checkpoint(
    ctx: RunContext, report: CompressionReport, output: Path, overwrite: bool, max_shard_bytes: int, start: float
) -> None:
    """The checkpoint of a finished run (a streamed one's from its stored layers), then the run's states removed."""
    from .io.checkpoint import save_checkpoint

    loaded, recipe, plan, reports = ctx.loaded, ctx.recipe, ctx.plan, ctx.quant_reports
    dtype = getattr(torch, recipe.save_dtype)
    tensors = (
        [
            *loaded.outside_state(dtype).items(),
            *((t.name, t) for t in ctx.store.layer_tensors(len(loaded.layers))),
        ]
        if ctx.store is not None
        else None
    )
    report.seconds = time.perf_counter() - start
    with disk_errors(f"the checkpoint {output}", ctx.store.folder if ctx.store is not None else None, True):
        report.output = str(
            save_checkpoint(
                loaded.model,
                output,
                recipe.to_yaml(),
                loaded.source,
                report.to_dict(),
                dtype,
                max_shard_bytes,
                extra_files={
                    RUN_RECORD: json.dumps(run_record(report, recipe, plan, reports, Path(output)).to_dict(), indent=1),
                    **({"plan.json": json.dumps(plan.to_dict(), indent=1)} if plan else {}),
                },
                overwrite=overwrite,
                tensors=tensors,
            )
        )
    for stage in STAGES:  # only an interrupted job needs its training state
        if stage.trains:
            shutil.rmtree(ctx.state_dir(stage.name), ignore_errors=True)
    if ctx.store is not None:
        ctx.store.remove()


def _keep_resumable(store: LayerStore, exc: BaseException) -> None:
    """After a failure: keep what a rerun resumes from, and say so (in the error itself when it is ours)."""
    with contextlib.suppress(Exception):
        store.flush()  # the layer in flight is finished too
    store.drop_unresumable()
    kept = store.kept()
    if kept is None or str(store.folder) in str(exc):
        return
    note = f"{kept} kept in {store.folder}: rerun the same command to resume, or delete that folder to start over"
    if isinstance(exc, MoECompressError) and len(exc.args) == 1:
        exc.args = (f"{exc.args[0]} ({note}).",)
    else:
        log.warning(note)


def _run_stages(ctx: RunContext) -> dict[str, float]:
    seconds, stages = {}, [stage for stage in STAGES if stage.enabled(ctx.recipe)]
    for stage in stages:
        stage.check_memory(ctx)
    for stage in stages:
        began = time.perf_counter()
        result = stage.run(ctx)
        seconds[stage.name] = round(time.perf_counter() - began, 2)
        log.info("stage %s done in %.1f s", stage.name, seconds[stage.name])
        if result is not None:
            ctx.reports[stage.name] = result
    return seconds


def job_fingerprint(
    loaded: StreamedModel, recipe: Recipe, plan: CompressionPlan | None, batches: list[CalibrationBatch]
) -> str:
    """What a resumed run must share with the run it continues: recipe, plan, the source's files and the content of
    the calibration batches (a data file edited in place is another job)."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in {t.file for t in loaded.tensors.values()})
    config = (local_folder(loaded.source) / "config.json").read_text()
    job = {"recipe": recipe.to_yaml(), "plan": plan.to_dict() if plan else None, "files": files, "config": config}
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode())
    for batch in batches:
        for name, value in sorted(batch.inputs.items()):
            if isinstance(value, torch.Tensor):
                digest.update(name.encode())
                digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_record(
    report: CompressionReport,
    recipe: Recipe,
    plan: CompressionPlan | None,
    reports: list[ExpertQuantReport],
    output: Path,
) -> RunRecord:
    """The record `moecompress report` and the model card read: what was done, bits per expert, routing shares."""
    if report.stages.get("factor"):
        method = f"{recipe.quantization.method} factored experts ({report.bits_per_expert_param:.2f} bits)"
    elif plan is None:
        method = "bf16 experts" if recipe.quantization.method == "none" else recipe.quantization.method
    elif len(plan.formats) == 1:
        method = f"{recipe.quantization.method} {plan.formats[0].name}"
    else:
        method = f"{recipe.quantization.method} mixed {plan.method} ({plan.average_bits:.2f} bits)"
    stages = [s.name for s in STAGES if s.names_the_method and report.stages.get(s.name)]
    record = RunRecord(
        name=output.name,
        model=str(output.expanduser().resolve()),
        base_model=report.model,
        recipe=recipe.name,
        method=" + ".join([method, *stages]),
        expert_bits_per_param=report.bits_per_expert_param,
        compression={**report.to_dict(), "rare_experts": len(report.rare_experts)},
    )
    if plan is not None:
        record.bit_allocation = {"layers": plan.layers, "values": plan.bits.mean(dim=2).tolist()}
    if reports:
        layers = list(dict.fromkeys(r.layer for r in reports))  # block keys, in the model's order
        tokens = torch.zeros(len(layers), max(r.expert for r in reports) + 1)
        for r in reports:
            tokens[layers.index(r.layer), r.expert] = r.tokens
        record.importance = {
            "layers": layers,
            "metric": "share of the layer's calibration routings",
            "values": (tokens / tokens.sum(1, keepdim=True).clamp(min=1)).tolist(),
        }
    return record
