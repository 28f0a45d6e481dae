import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class GraniteMoeAdapter(ModelAdapter):
    """Granite-MoE (and Granite-MoE-Shared, whose shared MLP sits beside the block): top-k of the router logits,
    softmax over the k chosen."""

    model_types = ("granitemoe", "granitemoeshared")
    block_name = "block_sparse_moe"
    router_name = "router"
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        logits = torch.nn.functional.linear(hidden, router.weight.to(hidden.dtype)).float()
        if excluded is not None:
            logits = logits.masked_fill(excluded.to(logits.device), float("-inf"))
        top, indices = logits.topk(router.top_k, dim=-1)
        return torch.softmax(top, dim=-1).to(hidden.dtype), indices
