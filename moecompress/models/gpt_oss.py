import torch
from torch import nn

from .base import ExpertWeights, ModelAdapter
from .registry import register_adapter


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's expert activation: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = min(gate, l)."""

    gated = True

    def __init__(self, alpha: float, limit: float):
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)

    def kernel_spec(self) -> tuple[int, float, float]:
        """Kind 1 of the CPU fused forward (`csrc/cpu/moe_forward.cpp`)."""
        return (1, float(self.alpha), float(self.limit))


@register_adapter
class GptOssAdapter(ModelAdapter):
    """GPT-OSS: a `router` linear with a bias, softmax over the top-k logits; experts stored transposed
    (`gate_up_proj [E, H, 2I]` with gate and up columns interleaved, `down_proj [E, I, H]`), each projection
    with a bias, and a clamped SwiGLU."""

    model_types = ("gpt_oss",)
    router_name = "router"
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True

    def expert_weights(self, experts: nn.Module, e: int) -> ExpertWeights:
        gate_up, bias = experts.gate_up_proj[e], experts.gate_up_proj_bias[e]
        return ExpertWeights(
            gate_up[:, ::2].t(), gate_up[:, 1::2].t(), experts.down_proj[e].t(), bias[::2], bias[1::2],
            experts.down_proj_bias[e],
        )  # fmt: skip

    def set_expert_weights(self, experts: nn.Module, e: int, w: ExpertWeights) -> None:
        experts.gate_up_proj[e, :, ::2].copy_(w.gate_proj.t())
        experts.gate_up_proj[e, :, 1::2].copy_(w.up_proj.t())
        experts.down_proj[e].copy_(w.down_proj.t())
        for name, index, b in (("gate_up_proj_bias", 0, w.gate_bias), ("gate_up_proj_bias", 1, w.up_bias)):
            if b is not None:
                getattr(experts, name)[e, index::2].copy_(b)
        if w.down_bias is not None:
            experts.down_proj_bias[e].copy_(w.down_bias)

    def replace_experts(self, experts: nn.Module, weights: list[ExpertWeights]) -> None:
        dtype, grad = experts.down_proj.dtype, experts.down_proj.requires_grad

        def interleave(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [..., I] x 2 -> [..., 2I]
            return torch.stack([gate, up], dim=-1).flatten(-2)

        tensors = {
            "gate_up_proj": torch.stack([interleave(w.gate_proj.t(), w.up_proj.t()) for w in weights]),
            "gate_up_proj_bias": torch.stack([interleave(w.gate_bias, w.up_bias) for w in weights]),
            "down_proj": torch.stack([w.down_proj.t() for w in weights]),
            "down_proj_bias": torch.stack([w.down_bias for w in weights]),
        }
        for name, tensor in tensors.items():
            setattr(experts, name, nn.Parameter(tensor.to(dtype).contiguous(), requires_grad=grad))
        experts.num_experts, experts.intermediate_size = len(weights), int(tensors["down_proj"].shape[1])

    def expert_parameters(self, experts: nn.Module) -> list[nn.Parameter]:
        return [experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj, experts.down_proj_bias]

    def down_projections(self, experts: nn.Module) -> tuple[nn.Parameter, bool]:
        return experts.down_proj, True

    def expert_activation(self, experts: nn.Module) -> nn.Module:
        return ClampedSwiGLU(experts.alpha, experts.limit)
