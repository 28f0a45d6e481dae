from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class Qwen2MoeAdapter(ModelAdapter):
    """Qwen2-MoE: softmax router plus an always-on shared expert scaled by sigmoid(shared_expert_gate(x))."""

    model_types = ("qwen2_moe",)

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_expert
