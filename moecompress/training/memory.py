"""What a whole-model training stage (slimming, recovery) needs in memory, stated before the model is loaded, and
where its teacher goes: in bfloat16 next to the student when it fits, else offloaded by accelerate's big-model
loading (the layers that do not fit stay on disk and are read in at each forward)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InsufficientMemoryError

log = logging.getLogger(__name__)

HEADROOM = 1.1  # activations, allocator slack


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of a distillation: the float32 student, float32 gradients and two Adam moments of its routed experts
    (what the stages train), and a bfloat16 teacher."""

    params: int
    expert_params: int
    teacher_params: int

    @property
    def student(self) -> int:
        return 4 * self.params + 12 * self.expert_params

    @property
    def teacher(self) -> int:
        return 2 * self.teacher_params

    def describe(self) -> str:
        return (
            f"about {(self.student + self.teacher) / 1e9:.1f} GB: the float32 student with its optimizer states "
            f"{self.student / 1e9:.1f} GB, the bfloat16 teacher {self.teacher / 1e9:.1f} GB"
        )


def available_bytes(device: str = "cpu") -> int:
    """Memory free for this process on `device` (MemAvailable for the CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def require_room(need: TrainingMemory, stages: list[str], device: str = "cpu") -> None:
    """Log what `stages` need; refuse up front when the student alone cannot fit (the teacher can be offloaded)."""
    free = available_bytes(device)
    log.warning(
        "stages %s train the whole model: %s; %.1f GB available on %s",
        ", ".join(stages),
        need.describe(),
        free / 1e9,
        device,
    )
    if need.student * HEADROOM > free:
        raise InsufficientMemoryError(
            f"stages {', '.join(stages)} need {need.student * HEADROOM / 1e9:.1f} GB for the float32 model and its "
            f"optimizer states, but {free / 1e9:.1f} GB is available on {device}: use a machine with more memory, or "
            "a recipe without them (merging, allocation and quantization stream one layer at a time)."
        )


def teacher_placement(teacher_bytes: int, reserve: int, offload_folder: Path, device: str = "cpu") -> dict:
    """`from_pretrained` arguments for a bfloat16 teacher: on `device` whole when it fits next to `reserve` bytes
    still to be allocated (optimizer states), else as much as fits there and the rest offloaded to disk."""
    budget = available_bytes(device) - int(reserve * HEADROOM)
    if teacher_bytes * HEADROOM <= budget:
        return {"device_map": {"": device}}
    log.warning(
        "the %.1f GB teacher does not fit in the %.1f GB left: offloading what does not fit to %s",
        teacher_bytes / 1e9,
        max(budget, 0) / 1e9,
        offload_folder,
    )
    offload_folder.mkdir(parents=True, exist_ok=True)
    memory = {0 if device.startswith("cuda") else "cpu": max(budget, 0)}
    if device.startswith("cuda"):
        memory["cpu"] = max(available_bytes("cpu") - int(reserve * HEADROOM), 0)
    return {"device_map": "auto", "max_memory": memory, "offload_folder": str(offload_folder)}
