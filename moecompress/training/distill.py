"""Knowledge distillation from a teacher model into a student, through accelerate (CPU, one GPU, or
multi-GPU when launched with `accelerate launch`), resumable from its last saved state.

Loss per token: T^2 * KL(teacher || student) on temperature-T softmaxed logits, plus optionally
`hidden_weight` x the MSE of the last hidden states normalised by the teacher's mean square.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.batches import image_mask, load_tokenizer_or_processor
from ..calibration.config import CalibrationConfig
from ..calibration.data import CalibrationBatch, text_calibration_batches, vl_calibration_batches, window_counts_problem
from ..errors import CheckpointError, RecipeError
from ..models.loading import LoadedModel

STATE_FILE = "progress.json"
LOG_EVERY = 10  # steps per averaged loss in the report


@dataclass
class DistillConfig:
    """How a stage distills (recovery, slimming; their sections inherit these keys). Data: `dataset` (default:
    the calibration dataset) cut into num_samples x seq_len windows in batches of batch_size, plus
    vl_num_samples image+text items for VL models. Loss: `temperature`, `hidden_weight`. Schedule: linear
    warm-up over warmup_steps, then cosine down to min_lr_ratio x the peak rate; gradients clipped to norm
    grad_clip (0: off); state saved every checkpoint_every steps. How long and how fast (steps, lr) each stage
    names itself."""

    dataset: str | None = None
    num_samples: int = 512
    vl_num_samples: int = 128
    seq_len: int = 256
    batch_size: int = 4
    temperature: float = 1.0
    hidden_weight: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 1

    def check_distill(self, where: str) -> None:
        problem = window_counts_problem(self, where)
        if problem:
            raise RecipeError(f"{problem}.")
        if self.temperature <= 0 or self.checkpoint_every < 1:
            raise RecipeError(f"{where}: temperature and checkpoint_every must be positive.")
        if self.hidden_weight < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise RecipeError(f"{where}: hidden_weight, warmup_steps and grad_clip must be 0 or more.")
        if not 0 <= self.min_lr_ratio <= 1:
            raise RecipeError(
                f"{where}.min_lr_ratio {self.min_lr_ratio}: the final fraction of the peak rate, in [0, 1]"
            )


@dataclass
class DistillReport:
    steps: int
    resumed_from: int
    seconds: float
    first_loss: float | None
    final_loss: float
    losses: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per token T^2 * KL(softmax(teacher / T) || softmax(student / T))."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1) * t * t


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over (unmasked) tokens of `token_kl`."""
    kl = token_kl(student_logits, teacher_logits, temperature)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _lr_lambda(config: DistillConfig, steps: int):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: list[CalibrationBatch],
    param_groups: list[dict],
    config: DistillConfig,
    steps: int,
    state_dir: str | Path | None = None,
    fingerprint: str = "",
    progress: bool = True,
    cpu: bool = True,
    teacher_context: Callable[[], AbstractContextManager] | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
) -> DistillReport:
    """Train the parameters in `param_groups` (torch optimizer groups, each with its peak "lr") for `steps`
    steps so that `student` matches `teacher` on `batches`, cycled in order.

    state_dir: where the accelerate state (model, optimizer, scheduler, RNG) is saved every
    `checkpoint_every` steps; a run finding a state there resumes from it. `fingerprint` identifies
    the job (e.g. a hash of the recipe): a state with another fingerprint is refused, not mixed in.
    teacher None: the teacher is `student` itself run inside `teacher_context()` (e.g. with its skip masks
    off). extra_loss: a term added to every step's loss (e.g. a sparsity penalty the forward recorded).
    """
    from accelerate import Accelerator

    config.check_distill("distill")
    if steps < 1 or any(group.get("lr", -1) < 0 for group in param_groups):
        raise RecipeError("distill: steps must be positive and every parameter group needs an lr of 0 or more.")
    if not batches:
        raise RecipeError("distillation needs at least one batch of training data.")
    if teacher is None and teacher_context is None:
        raise RecipeError("distillation without a teacher model needs a teacher_context for the student to act as one.")
    accelerator = Accelerator(cpu=cpu)
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, steps))
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if teacher is not None:  # a teacher placed by accelerate's big-model loading (offloaded layers) stays as placed
        teacher.eval().requires_grad_(False)
        if not getattr(teacher, "hf_device_map", None):
            teacher.to(accelerator.device)
    trainable = [p for group in param_groups for p in group["params"]]

    start, losses = 0, []
    state_dir = Path(state_dir).expanduser() if state_dir is not None else None
    latest = state_dir / "latest" if state_dir is not None else None
    if latest is not None and (latest / STATE_FILE).is_file():
        saved = json.loads((latest / STATE_FILE).read_text())
        if saved.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{state_dir} holds the training state of another job (recipe or model differ). "
                "Delete that folder to start over, or point the state directory elsewhere."
            )
        accelerator.load_state(str(latest))
        start, losses = int(saved["step"]), [tuple(x) for x in saved["losses"]]
        accelerator.print(f"resuming distillation from step {start} of {steps} ({latest})")

    student.eval()  # no dropout / router jitter; gradients still flow
    began, first_loss, running = time.perf_counter(), (losses[0][1] if losses else None), []
    bar = tqdm(
        range(start, steps),
        desc="distill",
        disable=not progress or not accelerator.is_main_process,
        initial=start,
        total=steps,
    )
    for step in bar:
        batch = batches[step % len(batches)]
        inputs = {k: v.to(accelerator.device) for k, v in batch.inputs.items()}
        want_hidden = config.hidden_weight > 0
        with torch.no_grad(), teacher_context() if teacher is None else nullcontext():
            t_out = (student if teacher is None else teacher)(
                **inputs, use_cache=False, output_hidden_states=want_hidden
            )
        s_out = student(**inputs, use_cache=False, output_hidden_states=want_hidden)
        mask = inputs.get("attention_mask")
        if batch.image_mask is not None and batch.image_mask.any():  # predictions at image positions are never used
            mask = (torch.ones_like(batch.image_mask) if mask is None else mask.bool()) & ~batch.image_mask.to(
                s_out.logits.device
            )
        loss = distillation_loss(s_out.logits, t_out.logits.to(s_out.logits.device), mask, config.temperature)
        if want_hidden:
            target = t_out.hidden_states[-1].to(s_out.logits.device).float()
            loss = (
                loss + config.hidden_weight * F.mse_loss(s_out.hidden_states[-1].float(), target) / target.pow(2).mean()
            )
        if extra_loss is not None:
            loss = loss + extra_loss()
        if not torch.isfinite(loss):
            raise RecipeError(f"distillation loss became {float(loss)} at step {step}: lower the learning rate.")
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        first_loss = value if first_loss is None else first_loss
        running.append(value)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            losses.append((step + 1, sum(running) / len(running)))
            running = []
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
        if latest is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == steps):
            _save_state(accelerator, latest, {"step": step + 1, "losses": losses, "fingerprint": fingerprint})
    accelerator.wait_for_everyone()
    final = losses[-1][1] if losses else float("nan")
    return DistillReport(steps, start, time.perf_counter() - began, first_loss, final, losses)


def _save_state(accelerator, latest: Path, progress: dict) -> None:
    """accelerate state + progress, written beside `latest` and swapped in, so a crash keeps the last good state."""
    tmp, old = latest.parent / f".{latest.name}.tmp", latest.parent / f".{latest.name}.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(progress))
        if latest.exists():
            os.replace(latest, old)
        os.replace(tmp, latest)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def training_batches(
    loaded: LoadedModel, r: DistillConfig, cal: CalibrationConfig, trust_remote_code: bool = False
) -> list[CalibrationBatch]:
    """Training data of a distillation stage: text windows (+ image+text items for VL models), shuffled together."""
    processor = load_tokenizer_or_processor(
        loaded.source, loaded.adapter.is_multimodal, trust_remote_code, loaded.model.config
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    batches = text_calibration_batches(
        r.dataset or cal.dataset, tokenizer, r.num_samples, r.seq_len, r.batch_size, r.seed
    )
    if loaded.adapter.is_multimodal and cal.vl_dataset and r.vl_num_samples:
        batches += vl_calibration_batches(cal.vl_dataset, processor, image_mask(loaded), r.vl_num_samples, r.seed)
    random.Random(r.seed).shuffle(batches)
    return batches
