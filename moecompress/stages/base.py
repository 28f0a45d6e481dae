"""What every stage shares: the `Stage` base class, the registry `STAGES` (in pipeline order) and the `RunContext`
of one `compress` run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from ..allocation import CompressionPlan
from ..calibration.batches import activation_holding
from ..calibration.budget import MemoryPlan, budget_bytes, layer_costs, plan_memory
from ..calibration.data import CalibrationBatch
from ..calibration.engine import Walk, run_layerwise
from ..distributed import Ranks, local_ranks
from ..errors import RecipeError
from ..models import LoadedModel, MoEBlockView
from ..models.streaming import StreamedModel, resident_bytes
from ..quant.experts import ExpertQuantReport
from ..runtime.packed_experts import packed_state, persistent_state
from ..storage.layer_store import LayerStore
from ..training.memory import available_bytes

if TYPE_CHECKING:
    from ..recipe import Recipe

log = logging.getLogger(__name__)


class Stage:
    """A compression stage. It owns its recipe section (`section`, read into the dataclass `config`; the recipe
    schema is assembled from the registered stages) and the checks of that section against the others
    (`validate`), says when it runs (`enabled`) and how (`streams`: layer by layer, so a streamed run holds one
    layer at a time; `splits`: over expert-parallel ranks; `trains`: on the whole model, with a teacher from
    `teacher`), and `run(ctx)` returns its report (the compression report's field `name`) or None. `order` places
    it in the pipeline."""

    name: ClassVar[str] = ""
    order: ClassVar[float] = 0.0
    validated_first: ClassVar[bool] = False  # other sections' checks rely on this one's (quantization: the formats)
    section: ClassVar[str | None] = None
    config: ClassVar[type | None] = None
    streams: ClassVar[bool] = False
    trains: ClassVar[bool] = False
    splits: ClassVar[bool] = False  # runs over expert-parallel ranks, each rank its share of every layer's experts
    names_the_method: ClassVar[bool] = False  # its name joins the run record's method ("gptq w4g128 + skip")
    path_keys: ClassVar[tuple[str, ...]] = ()  # keys of its section that are file paths (relative to the recipe)

    def enabled(self, recipe: Recipe) -> bool:
        return False

    def validate(self, recipe: Recipe) -> None:
        """Raise `RecipeError` (through `recipe.fail`) for a section value this stage cannot run with."""

    def teacher(self, recipe: Recipe) -> str | None:
        """A training stage's teacher source (None: the model being compressed)."""
        return None

    def check_memory(self, ctx: RunContext) -> None:
        """Before any stage runs: refuse (`ctx.memory_plan`) when this stage's streamed layers cannot fit the budget,
        so that no stage's output is kept for a job that cannot finish."""

    def run(self, ctx: RunContext) -> dict | None:
        raise NotImplementedError


STAGES: list[Stage] = []


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add a stage to the pipeline at its `order`."""
    if any(s.name == cls.name for s in STAGES):
        raise ValueError(f"stage '{cls.name}' is registered twice")
    STAGES.append(cls())
    STAGES.sort(key=lambda s: s.order)
    return cls


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
    memory: MemoryPlan | None = None  # the plan of the last streamed walk under the memory budget
    stored_apart: dict[int, set[str]] = field(default_factory=dict)  # per layer, its tensors stored chunk by chunk
    ranks: Ranks = field(default_factory=Ranks)  # an expert-parallel job's ranks (rank 0 holds `store` and writes)
    _parts: list[tuple[int, int, dict]] = field(default_factory=list)  # this rank's chunks of the layer, for rank 0

    @property
    def cpu(self) -> bool:
        return self.recipe.device == "cpu"

    def state_dir(self, stage: str) -> Path | None:
        """Where a resumable stage keeps its state: `<output>.<stage>-state/` (none without an output)."""
        return Path(str(self.output.expanduser()) + f".{stage}-state") if self.output is not None else None

    def fingerprint(self) -> str:
        from ..training.qat import job_fingerprint

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
        return self.loaded.adapter.moe_blocks_by_layer(self.loaded.model)

    def resume_point(self) -> tuple[int, object] | None:
        """Where a streamed run stopped before (first layer to do, its inputs), or None; every rank gets rank 0's."""
        resume = self.store.resume_point() if self.store is not None else None
        if resume is not None:
            log.info("resuming after layer %d from %s", resume[0] - 1, self.store.folder)
        if self.ranks.multi:
            resume = self.ranks.from_first(None if resume is None else (resume[0], [h.cpu() for h in resume[1]]))
        return resume

    def store_layer(self, index: int, layer: torch.nn.Module, record: dict, hidden) -> None:
        """A streamed run's finished layer: its tensors as the checkpoint will hold them, with `record` (what a
        resumed run needs to rebuild it in the skeleton); nothing when the model is in memory."""
        if self.ranks.multi:
            parts, self._parts = self._parts, []
            self.ranks.to_first(parts, self._save_parts)
        if self.store is None:
            return
        prefix = f"{self.loaded.adapter.layers_prefix(self.loaded.model)}.{index}."
        apart = frozenset(self.stored_apart.pop(index, ()))
        state = persistent_state(layer, getattr(torch, self.recipe.save_dtype), apart)
        self.store.save_layer(index, {prefix + k: v for k, v in state.items()}, record, hidden)

    def store_experts(self, view: MoEBlockView, packed: list[dict]) -> None:
        """The packed experts of the chunk a streamed layer holds (`view.held`), stored at once and left out of the
        layer's own file (its record lists the parts)."""
        layer = self.loaded.layers[view.layer_index]
        path = next(name for name, module in layer.named_modules() if module is view.experts)
        state = {f"{path}.{k}": v for k, v in packed_state(view, packed, view.held.start).items()}
        self.stored_apart.setdefault(view.layer_index, set()).update(state)
        part = (view.layer_index, view.held.start, state)
        if self.ranks.multi:  # handed to rank 0 when the layer is done (`store_layer`)
            self._parts.append(part)
        else:
            self._save_parts([part])

    def _save_parts(self, parts: list[tuple[int, int, dict]]) -> None:
        """Chunks of packed experts (layer, first expert, tensors named within the layer), any rank's, into the store
        (rank 0's; the other ranks have none)."""
        for index, first, state in parts:
            self.stored_apart.setdefault(index, set()).update(state)
            if self.store is not None:
                prefix = f"{self.loaded.adapter.layers_prefix(self.loaded.model)}.{index}."
                self.store.save_part(index, first, {prefix + k: v for k, v in state.items()})

    def memory_plan(
        self, stage: str, statistics, chunks: bool = False, announce: bool = True, split: bool = True
    ) -> dict[int, int] | None:
        """A streamed walk of `stage` (collecting `statistics`) under the recipe's memory budget: per decoder layer
        whose experts do not fit at once, the experts per chunk (only where `chunks`: the stage works a chunk at a
        time). With several ranks, one rank's plan: its share of the experts (where `split`: the walk splits them), the
        default budget its part of the machine's free memory. Logged (with `announce`) and kept for the report;
        refused in one line when it cannot fit. None for a model in memory."""
        if not isinstance(self.loaded, StreamedModel):
            return None
        ranks = self.ranks if split else Ranks()  # (not split: every rank holds whole layers)
        if ranks.multi:
            self._check_ranks(stage, chunks)
        cal, resident = self.recipe.calibration, resident_bytes()
        costs, outside = layer_costs(self.loaded, self.batches, cal, statistics, resident, ranks)
        free = available_bytes(self.recipe.device) // (local_ranks() if self.cpu else 1)  # ranks share this RAM
        budget = budget_bytes(cal.max_memory, free, resident)
        self.memory = plan_memory(
            costs, outside, budget, cal.experts_per_chunk, lambda i: self._cannot_chunk(stage, i, chunks)
        )
        log.log(logging.INFO if announce else logging.DEBUG, "%s: %s", stage, self.memory.describe())
        return {i: self.memory.chunk(i) for i in range(len(costs)) if self.memory.chunk(i) is not None}

    def _check_ranks(self, stage: str, chunks: bool) -> None:
        """Refuse, in one line, a job whose layers cannot be split over its ranks."""
        n = self.ranks.size
        for index, views in self.layer_views().items():
            experts = min(v.num_experts for v in views)
            if experts < n:
                raise RecipeError(
                    f"{n} ranks for decoder layer {index}'s {experts} routed experts: each rank needs one at least; "
                    f"run on at most {experts} ranks."
                )
            why = self._cannot_chunk(stage, index, chunks)
            if why is not None:
                raise RecipeError(f"{n} ranks cannot split decoder layer {index}'s experts ({why}); run on one rank.")

    def _cannot_chunk(self, stage: str, index: int, chunks: bool) -> str | None:
        """Why layer `index`'s experts cannot be worked on a chunk at a time in `stage` (None: they can)."""
        views = self.layer_views().get(index, [])
        if not chunks:
            return f"stage {stage} works on whole layers"
        if not self.loaded.adapter.observes_routing:
            return f"the {self.loaded.adapter.model_types[0]} family file routes tokens itself"
        if len(views) != 1 or self.loaded.adapter.layout(views[0].experts)[2]:
            return "its experts have biases or modality groups"
        return self.loaded.can_chunk(index)

    def walk(self, stage: str, on_moe_layer, on_layer_done, resume, **options) -> None:
        """`run_layerwise` over the loaded model and the calibration batches for `stage`, each finished layer handed
        to `on_layer_done`, from `resume` on; `options`: the rest of the `Walk`."""
        options.setdefault("ranks", self.ranks)
        if "chunks" not in options:  # a stage that holds whole layers: refused up front when one cannot fit
            self.memory_plan(stage, options.get("statistics", Walk.statistics), split=options["ranks"].multi)
        with self.activations(stage) as holding:
            walk = Walk(
                self.recipe.device,
                progress=self.progress and self.ranks.first,
                layers_from=self.loaded,
                on_layer_done=on_layer_done,
                resume=resume,
                activations=holding,
                **options,
            )
            run_layerwise(self.loaded.model, self.loaded.adapter, self.batches, on_moe_layer, walk)
