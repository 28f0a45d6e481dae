from .base import VisionLanguageAdapter
from .glm4_moe import Glm4MoeAdapter
from .registry import register_adapter


@register_adapter
class Glm4vMoeAdapter(VisionLanguageAdapter, Glm4MoeAdapter):
    """GLM-4.5V / 4.6V (glm4v_moe): GLM-4.5's text decoder (sigmoid group-limited routing, shared experts, dense first
    layers; the router module holds the routing state) behind a vision tower."""

    model_types = ("glm4v_moe",)
