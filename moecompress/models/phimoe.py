import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class PhimoeAdapter(ModelAdapter):
    """Phi-3.5-MoE: SparseMixer top-2 at inference. Each pick is the best remaining logit; its weight is its softmax
    among the logits within 2 x `router_jitter_noise` (relative) of it."""

    model_types = ("phimoe",)
    router_name = "router"
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        scores = nn.functional.linear(hidden, router.weight)
        if excluded is not None:
            scores = scores.masked_fill(excluded.to(scores.device), float("-inf"))
        remaining, weights, indices = scores, [], []
        for _ in range(router.top_k):
            threshold, index = remaining.max(dim=-1, keepdim=True)
            far = (threshold - scores) / scores.abs().clamp(min=threshold) > 2 * router.router_jitter_noise
            gates = torch.softmax(remaining.masked_fill(far, float("-inf")), dim=-1)
            weights.append(gates.gather(-1, index))
            indices.append(index)
            remaining = remaining.scatter(-1, index, float("-inf"))
        return torch.cat(weights, dim=-1), torch.cat(indices, dim=-1)
