import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class HunYuanMoeV1Adapter(ModelAdapter):
    """Hunyuan-A13B (hunyuan_v1_moe): softmax top-k with renormalisation from the router's `wg` linear, computed in
    float32; an always-on shared MLP; experts as wide as the shared MLP (`intermediate_size`)."""

    model_types = ("hunyuan_v1_moe",)
    expert_intermediate_key = "intermediate_size"

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_mlp

    def router_linear(self, router: nn.Module) -> nn.Module:
        return router.wg

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        logits = torch.nn.functional.linear(hidden.float(), router.wg.weight.float())
        if excluded is not None:
            logits = logits.masked_fill(excluded.to(logits.device), float("-inf"))
        top_k = min(router.top_k, router.num_experts - (0 if excluded is None else int(excluded.sum())))
        weights, indices = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        return (weights / weights.sum(dim=-1, keepdim=True)).to(hidden.dtype), indices
