import torch
from torch import nn

from .base import MoEBlockView, VisionLanguageAdapter, swap_forward
from .ernie4_5_moe import Ernie45MoeAdapter
from .registry import register_adapter

GROUPS = (("text_moe", "text"), ("vision_moe", "image"))  # (block attribute, the modality of its tokens)


def _layer_moe_forward(self, hidden_states: torch.Tensor, moe_mm_token_type_ids: torch.Tensor | None = None):
    """The layer's MoE forward, with its expert count read from the routers (pruning and merging change it)."""
    self.num_experts = self.text_moe.gate.weight.shape[0]
    return super(type(self), self).forward(hidden_states, moe_mm_token_type_ids)


@register_adapter
class Ernie45VLMoeAdapter(VisionLanguageAdapter, Ernie45MoeAdapter):
    """ERNIE-4.5-VL: each MoE layer holds two sparse blocks, each with its own router and experts of its own width:
    `text_moe` for text tokens, `vision_moe` for image and video tokens (their start and end markers included), and
    the layer's shared experts beside them. Each block is a view of its modality group, so statistics, bit
    allocation, quantization and skipping see text and vision experts as separate sets."""

    model_types = ("ernie4_5_vl_moe",)

    def moe_blocks(self, model: nn.Module) -> list[MoEBlockView]:
        prefix, views = self.layers_prefix(model), []
        for i, layer in enumerate(self.decoder_layers(model)):
            mlp = getattr(layer, self.block_name, None)
            if mlp is not None and hasattr(mlp, "text_moe"):
                swap_forward(mlp, _layer_moe_forward)
                views += [MoEBlockView(i, f"{prefix}.{i}.mlp.{a}", getattr(mlp, a), self, g) for a, g in GROUPS]
        return views

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return None  # they belong to the layer, beside both groups

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """The tokens the vision experts take: image and video tokens and their start and end markers."""
        c = model.config
        ids = (c.image_token_id, c.image_start_token_id, c.image_end_token_id)
        ids += (c.video_token_id, c.video_start_token_id, c.video_end_token_id)
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def set_expert_intermediate_size(self, model: nn.Module, size: int) -> None:
        model.config.text_config.moe_intermediate_size = [size, size]
