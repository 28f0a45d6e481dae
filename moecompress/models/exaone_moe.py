from .deepseek_v3 import DeepseekV3Adapter
from .registry import register_adapter


@register_adapter
class ExaoneMoeAdapter(DeepseekV3Adapter):
    """EXAONE-MoE: DeepSeek-V3's sigmoid group-limited routing and shared experts; sliding and full attention."""

    model_types = ("exaone_moe",)
    num_experts_key = "num_experts"
