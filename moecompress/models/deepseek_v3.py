import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class DeepseekV3Adapter(ModelAdapter):
    """DeepSeek-V3: sigmoid scores, bias-corrected group-limited top-k selection, weights from the
    uncorrected scores, optional renormalisation, times `routed_scaling_factor`; shared experts always on.
    The first `first_k_dense_replace` layers are dense and have no MoE block."""

    model_types = ("deepseek_v3",)
    num_experts_key = "n_routed_experts"

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_experts

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        logits = torch.nn.functional.linear(hidden.float(), router.weight.float())
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        if excluded is not None:
            choice = choice.masked_fill(excluded.to(choice.device), float("-inf"))
        n_group, per_group = router.num_group, router.num_experts // router.num_group
        group_scores = choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, router.num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, indices
