import torch
from torch import nn

from .base import VisionLanguageAdapter
from .registry import register_adapter


@register_adapter
class Qwen3VLMoeAdapter(VisionLanguageAdapter):
    """Qwen3-VL-MoE: the Qwen3-MoE text decoder (top-k weights always renormalised) behind a vision
    tower whose DeepStack features are added to the image-token positions after the first decoder layers."""

    model_types = ("qwen3_vl_moe",)

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True

    def capture_extras(self, text_model_kwargs: dict) -> dict:
        return {
            "visual_pos_masks": text_model_kwargs.get("visual_pos_masks"),
            "deepstack_visual_embeds": text_model_kwargs.get("deepstack_visual_embeds"),
        }

    def after_layer(self, layer_index: int, hidden: torch.Tensor, extras: dict) -> torch.Tensor:
        embeds, mask = extras.get("deepstack_visual_embeds"), extras.get("visual_pos_masks")
        if embeds is None or mask is None or layer_index >= len(embeds):
            return hidden
        hidden = hidden.clone()
        hidden[mask.to(hidden.device)] += embeds[layer_index].to(hidden.device, hidden.dtype)
        return hidden
