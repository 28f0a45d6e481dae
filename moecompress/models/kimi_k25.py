from .base import VisionLanguageAdapter
from .deepseek_v3 import DeepseekV3Adapter
from .registry import register_adapter


@register_adapter
class KimiK25Adapter(VisionLanguageAdapter, DeepseekV3Adapter):
    """Kimi-K2.5: the DeepSeek-V3 text decoder of Kimi-K2 behind the MoonViT vision tower."""

    model_types = ("kimi_k25",)
