from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class HunYuanMoeV1Adapter(ModelAdapter):
    """Hunyuan-A13B (hunyuan_v1_moe): softmax top-k with renormalisation from the router's `wg` linear; an always-on
    shared MLP; experts as wide as the shared MLP (`intermediate_size`)."""

    model_types = ("hunyuan_v1_moe",)
    expert_intermediate_key = "intermediate_size"

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_mlp

    def router_linear(self, router: nn.Module) -> nn.Module:
        return router.wg

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True
