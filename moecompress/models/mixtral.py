from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class MixtralAdapter(ModelAdapter):
    """Mixtral: softmax router whose top-k weights are always renormalised."""

    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True
