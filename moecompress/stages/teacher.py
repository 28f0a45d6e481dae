"""The teacher of a distillation stage (slimming, recovery)."""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from ..models import LoadedModel, get_adapter, load_model
from ..models.base import ModelAdapter
from ..models.streaming import parameter_count
from ..training.memory import teacher_placement
from .base import RunContext


def distill_teacher(ctx: RunContext, stage: str, source: str | None = None) -> LoadedModel:
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
        teacher = load_teacher(source, ctx.trust_remote_code, placement)
    if ctx.state_dir(stage) is None:  # no output, no state folder: the offloaded weights go with the teacher
        weakref.finalize(teacher.model, shutil.rmtree, folder, True)
    return teacher


def load_teacher(source: str, trust_remote_code: bool, placement: dict) -> LoadedModel:
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
