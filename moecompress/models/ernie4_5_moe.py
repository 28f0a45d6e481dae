import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class Ernie45MoeAdapter(ModelAdapter):
    """ERNIE-4.5-MoE: softmax probabilities, experts chosen on them plus the router's bias statistics
    (`moe_statics`), weights renormalised (floored at `moe_norm_min`); shared experts always on."""

    model_types = ("ernie4_5_moe",)
    num_experts_key = "moe_num_experts"

    def router_vectors(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(getattr(block, self.router_name).moe_statics, "e_score_correction_bias")]

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_experts

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        probs = torch.softmax(torch.nn.functional.linear(hidden.float(), router.weight.float()), dim=-1)
        choice = router.moe_statics(probs)
        if excluded is not None:
            choice = choice.masked_fill(excluded.to(choice.device), float("-inf"))
        indices = torch.topk(choice, router.top_k, dim=-1)[1]
        weights = probs.gather(-1, indices)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=router.norm_min)
        return weights.to(hidden.dtype), indices
