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
from ..calibration.data import CalibrationBatch
from ..calibration.engine import Walk, run_layerwise
from ..models import LoadedModel, MoEBlockView
from ..quant.experts import ExpertQuantReport
from ..runtime.packed_experts import persistent_state
from ..storage.layer_store import LayerStore

if TYPE_CHECKING:
    from ..recipe import Recipe

log = logging.getLogger(__name__)


class Stage:
    """A compression stage. It owns its recipe section (`section`, read into the dataclass `config`; the recipe
    schema is assembled from the registered stages) and the checks of that section against the others
    (`validate`), says when it runs (`enabled`) and how (`streams`: layer by layer, so a streamed run holds one
    layer at a time; `trains`: on the whole model, with a teacher from `teacher`), and `run(ctx)` returns its
    report (the compression report's field `name`) or None. `order` places it in the pipeline."""

    name: ClassVar[str] = ""
    order: ClassVar[float] = 0.0
    validated_first: ClassVar[bool] = False  # other sections' checks rely on this one's (quantization: the formats)
    section: ClassVar[str | None] = None
    config: ClassVar[type | None] = None
    streams: ClassVar[bool] = False
    trains: ClassVar[bool] = False
    names_the_method: ClassVar[bool] = False  # its name joins the run record's method ("gptq w4g128 + skip")
    path_keys: ClassVar[tuple[str, ...]] = ()  # keys of its section that are file paths (relative to the recipe)

    def enabled(self, recipe: Recipe) -> bool:
        return False

    def validate(self, recipe: Recipe) -> None:
        """Raise `RecipeError` (through `recipe.fail`) for a section value this stage cannot run with."""

    def teacher(self, recipe: Recipe) -> str | None:
        """A training stage's teacher source (None: the model being compressed)."""
        return None

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
