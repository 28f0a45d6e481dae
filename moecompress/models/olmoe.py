from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class OlmoeAdapter(ModelAdapter):
    """OLMoE: softmax router, `norm_topk_prob` from the config (false in the released models)."""

    model_types = ("olmoe",)
    expert_intermediate_key = "intermediate_size"
