import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class MiniMaxM2Adapter(ModelAdapter):
    """MiniMax-M2: sigmoid scores, experts chosen on the scores plus the block's `e_score_correction_bias`,
    weights from the uncorrected scores, renormalised."""

    model_types = ("minimax_m2",)
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"

    def route_block(self, block: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        scores = torch.nn.functional.linear(hidden.to(block.gate.weight.dtype), block.gate.weight).float().sigmoid()
        choice = scores + block.e_score_correction_bias
        if excluded is not None:
            choice = choice.masked_fill(excluded.to(choice.device), float("-inf"))
        indices = torch.topk(choice, block.gate.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        return weights / weights.sum(dim=-1, keepdim=True), indices
