import torch
from torch import nn

from .base import ModelAdapter
from .registry import register_adapter


@register_adapter
class Qwen3VLMoeAdapter(ModelAdapter):
    """Qwen3-VL-MoE: the Qwen3-MoE text decoder (top-k weights always renormalised) behind a vision
    tower whose DeepStack features are added to the image-token positions after the first decoder layers."""

    model_types = ("qwen3_vl_moe",)
    is_multimodal = True
    default_ignore = ("lm_head", "visual")

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return True

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == model.config.image_token_id

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

    def auto_model_class(self):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
