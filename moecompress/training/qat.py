"""Quantization-aware recovery of packed experts (MoTE-style for ternary; any integer format too).

Each packed projection becomes a `FakeQuantLinear`: a latent float weight and a learnable scale; the
forward pass uses scale * (clamp(round(w / scale) + zero, 0, maxq) - zero), with straight-through
gradients for the rounding (w gets the identity, the scale the LSQ-style residual). Scales go through
fp16 in the forward pass, so converting back to packed codes reproduces the trained model exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import align_module_device
from torch import nn

from ..errors import RecipeError
from ..formats import SCALE_DTYPE, QTensor, QuantFormat, expand_scales, pack, unpack
from ..models.base import PROJECTIONS, ExpertWeights, ModelAdapter
from ..runtime.packed_experts import ExpertList, PackedExperts, PackedLinear
from .distill import DistillConfig, DistillReport, distill

QAT_INITS = ("original", "quantized")


def _expand(params: torch.Tensor, out_features: int, in_features: int, group: int) -> torch.Tensor:
    return expand_scales(params, out_features).repeat_interleave(group, dim=1)[:, :in_features]


class FakeQuantLinear(nn.Module):
    """A linear layer trained through its quantizer; `to_qtensor()` gives the codes it computes with."""

    def __init__(self, weight: torch.Tensor, qt: QTensor):
        super().__init__()
        self.fmt: QuantFormat = qt.fmt
        self.out_features, self.in_features = qt.shape
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.scale = nn.Parameter(qt.scales.to(torch.float32).clone())
        self.register_buffer("zero", qt.zeros.to(torch.float32).clone())

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        group = self.fmt.effective_group(self.in_features)
        scale = self.scale.clamp(min=torch.finfo(SCALE_DTYPE).tiny)
        scale = scale + (scale.to(SCALE_DTYPE).to(torch.float32) - scale).detach()
        return (
            _expand(scale, self.out_features, self.in_features, group),
            _expand(self.zero, self.out_features, self.in_features, group),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale, zero = self._parts()
        ratio = self.weight / scale
        code = torch.clamp(torch.round(ratio) + zero, 0, self.fmt.maxq)
        return (scale * (ratio + (code - zero - ratio).detach())).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    @torch.no_grad()
    def to_qtensor(self) -> QTensor:
        scale, zero = self._parts()
        codes = torch.clamp(torch.round(self.weight / scale) + zero, 0, self.fmt.maxq)
        scales = self.scale.clamp(min=torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE)
        return QTensor(codes.to(torch.uint8), scales, self.zero.to(torch.uint8), self.fmt)


class QATExpert(nn.Module):
    def __init__(self, projections: dict[str, FakeQuantLinear]):
        super().__init__()
        for name in PROJECTIONS:
            self.add_module(name, projections[name])


class QATExperts(ExpertList):
    """Trainable stand-in for a `PackedExperts` module, with the same routing and forward pass."""

    @classmethod
    def from_packed(cls, packed: PackedExperts, originals: list[ExpertWeights] | None = None) -> QATExperts:
        """Latent weights start at `originals` (the unquantized experts) or, without them, at the
        dequantized packed weights; scales start at the packed ones."""
        experts = []
        for e, expert in enumerate(packed):
            projections = {}
            for proj in PROJECTIONS:
                qt = unpack(getattr(expert, proj).packed())
                start = originals[e][proj] if originals is not None else qt.dequantize()
                projections[proj] = FakeQuantLinear(start, qt)
            experts.append(QATExpert(projections))
        return cls(experts, packed.hidden_size, packed.intermediate_size, packed.activation)

    def to_packed(self, method: str = "qat") -> PackedExperts:
        module = PackedExperts(self.hidden_size, self.intermediate_size, self.formats(), self.activation)
        for qat_expert, packed_expert in zip(self, module):
            for proj in PROJECTIONS:
                linear: PackedLinear = getattr(packed_expert, proj)
                linear.load_packed(pack(getattr(qat_expert, proj).to_qtensor()))
                linear.method = method
        return module.to(next(self.parameters()).device)


@dataclass
class RecoveryConfig(DistillConfig):
    """Quantization-aware distillation after PTQ, `steps` steps at peak rate `lr` for the latent weights and
    `scale_lr` for the scales; data, loss and schedule: `DistillConfig`. The state is saved every
    checkpoint_every steps in `<output>.recovery-state/` and a rerun resumes from it. `teacher`: distill from
    this model (folder or hub id, same tokenizer; e.g. the dense model of an upcycled MoE) instead of the
    source model; with a teacher of another layout use init: quantized."""

    enabled: bool = False
    steps: int = 200
    lr: float = 3e-4
    scale_lr: float = 3e-5
    init: str = "original"
    teacher: str | None = None

    def validate(self) -> RecoveryConfig:
        if self.steps < 1 or self.lr <= 0:
            raise RecipeError(f"recovery: steps {self.steps} and lr {self.lr} must be positive.")
        if self.scale_lr < 0:
            raise RecipeError(f"recovery.scale_lr {self.scale_lr}: use 0 (scales frozen) or more")
        self.check_distill("recovery")
        return self


def recover_quantized_experts(
    model: nn.Module,
    teacher: nn.Module,
    adapter: ModelAdapter,
    batches: list,
    config: RecoveryConfig,
    state_dir=None,
    fingerprint: str = "",
    progress: bool = True,
    cpu: bool = True,
) -> DistillReport:
    """Distill `teacher` into the packed experts of `model` (QAT with STE), then re-pack them in place.
    Everything else in `model` stays frozen."""
    views = [v for v in adapter.moe_blocks(model) if isinstance(v.experts, PackedExperts)]
    teacher_views = {v.key: v for v in adapter.moe_blocks(teacher)}
    if any(getattr(v.experts, "has_bias", False) for v in views):
        raise RecipeError(
            "recovery training of experts with biases (GPT-OSS) is not supported yet; remove `recovery` from the "
            "recipe."
        )
    model.requires_grad_(False)
    if config.init == "original" and any(
        v.key not in teacher_views or teacher_views[v.key].num_experts != v.num_experts for v in views
    ):
        raise RecipeError(
            "recovery.init original needs a teacher with the same experts as the model; "
            "this teacher has another layout: set recovery.init: quantized."
        )
    for view in views:
        originals = None
        if config.init == "original":
            source = teacher_views[view.key]
            with align_module_device(source.experts):  # an offloaded teacher's experts are read in for the copy
                originals = [
                    ExpertWeights(*(source.expert_weights(e)[p].float() for p in PROJECTIONS))
                    for e in range(view.num_experts)
                ]
        view.experts = QATExperts.from_packed(view.experts, originals)
    weights = [m.weight for v in views for m in v.experts.modules() if isinstance(m, FakeQuantLinear)]
    scales = [m.scale for v in views for m in v.experts.modules() if isinstance(m, FakeQuantLinear)]
    for p in weights + scales:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": config.lr}, {"params": scales, "lr": config.scale_lr}]
    try:
        report = distill(model, teacher, batches, groups, config, config.steps, state_dir, fingerprint, progress, cpu)
    finally:
        for view in views:
            if isinstance(view.experts, QATExperts):
                view.experts = view.experts.to_packed()
        model.requires_grad_(False)
    return report


def job_fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
