"""Staged expert slimming: score neurons (first-order Taylor on the LM loss), cut every routed expert to
the stage's width, distill from the original model, repeat until the target width.

Resumable: after each stage the whole student is saved in `<state_dir>/completed/` (swapped in atomically);
a rerun restores the last completed stage, and a stage interrupted during distillation resumes from
its own accelerate state in `<state_dir>/stage-<s>/`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..calibration.data import CalibrationBatch
from ..errors import CheckpointError, RecipeError
from ..models.base import ModelAdapter
from ..runtime.packed_experts import persistent_state
from ..training.distill import DistillConfig, distill
from .neurons import slice_expert, stage_widths, taylor_neuron_scores, top_neurons

TRAINABLE = ("all", "experts")


@dataclass
class SlimConfig(DistillConfig):
    """Keep `target` of the routed-expert parameters by cutting every expert's intermediate width, over
    `stages` stages; after each, `steps_per_stage` distillation steps (0: one-shot, no training).
    Neuron scores use `importance_batches` calibration batches; data, loss and schedule: `DistillConfig`.
    train: all (every weight of the student) | experts (routed experts only)."""

    enabled: bool = False
    target: float = 0.5
    stages: int = 3
    multiple_of: int = 8
    importance_batches: int = 8
    steps_per_stage: int = 100
    lr: float = 1e-4
    train: str = "all"

    def validate(self) -> SlimConfig:
        if not 0 < self.target < 1:
            raise RecipeError(f"slim.target {self.target}: the fraction of routed-expert parameters to keep, in (0, 1)")
        if self.stages < 1 or self.multiple_of < 1 or self.importance_batches < 1 or self.steps_per_stage < 0:
            raise RecipeError(
                "slim: stages, multiple_of and importance_batches must be positive, steps_per_stage >= 0."
            )
        if self.train not in TRAINABLE:
            raise RecipeError(f"slim.train '{self.train}': use one of {list(TRAINABLE)}")
        if self.lr <= 0:
            raise RecipeError(f"slim.lr {self.lr}: use a positive peak rate")
        self.check_distill("slim")
        return self


@dataclass
class SlimStage:
    width: int
    seconds_scoring: float
    distill: dict | None = None


@dataclass
class SlimReport:
    original_width: int
    final_width: int
    stages: list[SlimStage] = field(default_factory=list)
    resumed_after_stage: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _labels(batch: CalibrationBatch, inputs: dict) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    if "attention_mask" in inputs:
        labels[inputs["attention_mask"] == 0] = -100
    if batch.image_mask is not None:
        labels[batch.image_mask.to(labels.device).bool()] = -100
    return labels


def neuron_scores(model: nn.Module, adapter: ModelAdapter, batches: list[CalibrationBatch]) -> list[torch.Tensor]:
    """Per MoE block: first-order Taylor importance [E, I] of every expert neuron for the model's own
    next-token loss, summed over batches (absolute value per batch)."""
    views = adapter.moe_blocks(model)
    device = next(model.parameters()).device
    requires = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    stored = [adapter.down_projections(view.experts) for view in views]  # (param, stored transposed)
    downs = [p for p, _ in stored]
    for p in downs:
        p.requires_grad_(True)
    scores = [torch.zeros(p.shape[0], p.shape[1 if t else 2], dtype=torch.float64) for p, t in stored]
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            loss = model(**inputs, labels=_labels(batch, inputs), use_cache=False).loss
            grads = torch.autograd.grad(loss, downs)
            for total, (p, transposed), g in zip(scores, stored, grads):
                w, g = (p.detach().transpose(1, 2), g.transpose(1, 2)) if transposed else (p.detach(), g)
                total += taylor_neuron_scores(w, g).cpu()
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
    return scores


@torch.no_grad()
def cut_experts(model: nn.Module, adapter: ModelAdapter, keep: list[torch.Tensor]) -> None:
    """Keep the neurons `keep[b]` [E, w] of every expert of MoE block b (and their biases); record the new
    width in the config."""
    for view, indices in zip(adapter.moe_blocks(model), keep):
        rows = indices.to(view.device)
        view.replace_experts([slice_expert(view.expert_weights(e), rows[e]) for e in range(view.num_experts)])
    adapter.set_expert_intermediate_size(model, int(keep[0].shape[1]))


def _check_fused(model: nn.Module, adapter: ModelAdapter) -> int:
    views = adapter.moe_blocks(model)
    if not views or any(hasattr(v.experts, "expert_weights") for v in views):  # packed experts have it
        raise RecipeError(
            "slimming works on unquantized fused experts: run it before quantization (the pipeline does)."
        )
    widths = {v.intermediate_size for v in views}
    if len(widths) != 1:
        raise RecipeError(f"slimming needs one expert width across layers, found {sorted(widths)}.")
    return widths.pop()


def _save_completed(model: nn.Module, state_dir: Path, progress: dict) -> None:
    tmp, final = state_dir / ".completed.tmp", state_dir / "completed"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(persistent_state(model), str(tmp / "model.safetensors"))
    (tmp / "progress.json").write_text(json.dumps(progress))
    old = state_dir / ".completed.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _restore_completed(model: nn.Module, adapter: ModelAdapter, state_dir: Path, fingerprint: str) -> dict | None:
    folder = state_dir / "completed"
    if not (folder / "progress.json").is_file():
        return None
    progress = json.loads((folder / "progress.json").read_text())
    if progress.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{state_dir} holds the slimming state of another job (recipe or model differ). "
            "Delete that folder to start over."
        )
    width, experts = progress["width"], [v.num_experts for v in adapter.moe_blocks(model)]
    cut_experts(model, adapter, [torch.arange(width).expand(e, width) for e in experts])
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if unexpected or any(not _is_tied(model, name) for name in missing):
        raise CheckpointError(
            f"{folder} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})."
        )
    return progress


def _is_tied(model: nn.Module, name: str) -> bool:
    return name.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def slim_experts(
    model: nn.Module,
    adapter: ModelAdapter,
    teacher: nn.Module,
    score_batches: list[CalibrationBatch],
    train_batches: list[CalibrationBatch],
    config: SlimConfig,
    state_dir: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
    cpu: bool = True,
) -> SlimReport:
    """Slim the routed experts of `model` in place, stage by stage, distilling from `teacher` after each."""
    config.validate()
    width = _check_fused(model, adapter)
    target_width = max(round(width * config.target / config.multiple_of) * config.multiple_of, config.multiple_of)
    if target_width >= width:
        raise RecipeError(
            f"slim.target {config.target} of width {width} rounds to {target_width} neurons "
            f"(multiple_of {config.multiple_of}): lower the target or multiple_of."
        )
    widths = stage_widths(width, target_width, config.stages, config.multiple_of)
    report = SlimReport(width, target_width)
    state_dir = Path(state_dir).expanduser() if state_dir is not None else None
    done = _restore_completed(model, adapter, state_dir, fingerprint) if state_dir is not None else None
    if done is not None:
        report.resumed_after_stage = done["stage"] + 1
        report.stages = [SlimStage(**s) for s in done["stages"]]
    for stage, stage_width in enumerate(tqdm(widths, desc="slim stages", disable=not progress)):
        if stage < report.resumed_after_stage:
            continue
        began = time.perf_counter()
        scores = neuron_scores(model, adapter, score_batches[: config.importance_batches])
        cut_experts(model, adapter, [top_neurons(s, stage_width) for s in scores])
        record = SlimStage(stage_width, time.perf_counter() - began)
        if config.steps_per_stage > 0:
            params = _trainable(model, adapter, config.train)
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            try:
                record.distill = distill(
                    model,
                    teacher,
                    train_batches,
                    [{"params": params, "lr": config.lr}],
                    config,
                    config.steps_per_stage,
                    state_dir / f"stage-{stage}" if state_dir is not None else None,
                    f"{fingerprint}-stage{stage}",
                    progress,
                    cpu,
                ).to_dict()
            finally:
                model.requires_grad_(False)
                model.eval()
        report.stages.append(record)
        if state_dir is not None:
            _save_completed(
                model,
                state_dir,
                {
                    "stage": stage,
                    "width": stage_width,
                    "fingerprint": fingerprint,
                    "stages": [asdict(s) for s in report.stages],
                },
            )
    return report


def _trainable(model: nn.Module, adapter: ModelAdapter, which: str) -> list[nn.Parameter]:
    if which == "experts":
        return [p for view in adapter.moe_blocks(model) for p in adapter.expert_parameters(view.experts)]
    return [p for p in model.parameters() if p.is_floating_point()]
