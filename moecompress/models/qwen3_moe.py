from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class Qwen3MoeAdapter(ModelAdapter):
    """Qwen3-MoE: softmax router, optional top-k renormalisation, no shared expert."""

    model_types = ("qwen3_moe",)
