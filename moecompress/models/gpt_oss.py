import torch
from torch import nn

from .base import ModelAdapter
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
    """GPT-OSS: a `router` linear with a bias, softmax over the top-k logits; experts transposed, interleaved, with
    biases (the module's flags say so), and a clamped SwiGLU the CPU fused kernel computes (`ClampedSwiGLU`)."""

    model_types = ("gpt_oss",)
    router_name = "router"
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True

    def expert_activation(self, experts: nn.Module) -> nn.Module:
        return ClampedSwiGLU(experts.alpha, experts.limit)
