from .olmoe import OlmoeAdapter
from .registry import register_adapter


@register_adapter
class FlexOlmoAdapter(OlmoeAdapter):
    """FlexOlmo: OLMoE's softmax routing (`norm_topk_prob` from the config)."""

    model_types = ("flex_olmo",)
