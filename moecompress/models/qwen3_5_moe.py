from torch import nn

from .base import VisionLanguageAdapter
from .qwen3_next import Qwen3NextAdapter
from .registry import register_adapter


@register_adapter
class Qwen3_5MoeAdapter(VisionLanguageAdapter, Qwen3NextAdapter):
    """Qwen3.5-MoE: Qwen3-Next's hybrid decoder (Gated DeltaNet and full attention, gated shared expert) behind a
    vision tower; the router always renormalises its top-k weights."""

    model_types = ("qwen3_5_moe",)

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True
