import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class DeepseekV2Adapter(ModelAdapter):
    """DeepSeek-V2 / V2-Lite: softmax scores, top-k greedy or group-limited greedy (groups ranked by their best
    expert), not renormalised, times `routed_scaling_factor`; shared experts always on."""

    model_types = ("deepseek_v2",)
    num_experts_key = "n_routed_experts"

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_experts

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        scores = torch.nn.functional.linear(hidden.float(), router.weight.float()).softmax(dim=-1)
        if excluded is not None:  # never chosen, however few experts remain
            scores = scores.masked_fill(excluded.to(scores.device), -1.0)
        if router.topk_method == "group_limited_greedy":
            n_group, per_group = router.num_group, router.num_experts // router.num_group
            group_scores = scores.view(-1, n_group, per_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            keep = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, router.num_experts).bool()
            scores = scores.masked_fill(~keep, 0.0)
        weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return weights * router.routed_scaling_factor, indices
