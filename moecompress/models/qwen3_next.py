from .qwen2_moe import Qwen2MoeAdapter
from .registry import register_adapter


@register_adapter
class Qwen3NextAdapter(Qwen2MoeAdapter):
    """Qwen3-Next: Qwen2-MoE's routing and gated shared expert; Gated DeltaNet (linear) and full attention layers."""

    model_types = ("qwen3_next",)
