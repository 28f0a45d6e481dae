from .deepseek_v3 import DeepseekV3Adapter
from .registry import register_adapter


@register_adapter
class DeepseekV32Adapter(DeepseekV3Adapter):
    """DeepSeek-V3.2: DeepSeek-V3's MoE (sigmoid group-limited routing, shared experts) under sparse attention (the
    DSA indexer picks the keys each query attends to); dense layers as `mlp_layer_types` says."""

    model_types = ("deepseek_v32",)
