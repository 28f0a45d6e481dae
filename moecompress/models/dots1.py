from .deepseek_v3 import DeepseekV3Adapter
from .registry import register_adapter


@register_adapter
class Dots1Adapter(DeepseekV3Adapter):
    """dots.llm1: DeepSeek-V3's sigmoid group-limited routing and shared experts."""

    model_types = ("dots1",)
