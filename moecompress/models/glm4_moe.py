from .deepseek_v3 import DeepseekV3Adapter
from .registry import register_adapter


@register_adapter
class Glm4MoeAdapter(DeepseekV3Adapter):
    """GLM-4.5 / 4.6 (glm4_moe): DeepSeek-V3's sigmoid group-limited routing and shared experts; dense first layers."""

    model_types = ("glm4_moe",)
