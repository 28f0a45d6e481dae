import functools

import torch
from torch import nn

from .qwen3_vl_moe import Qwen3VLMoeAdapter
from .registry import register_adapter


@functools.cache
def _omni_class():
    """transformers' Qwen3-Omni-MoE class with a forward: its thinker's (the class itself only generates), so
    calibration, evaluation and skipping call the model as any other; same name, so checkpoints keep it."""
    from transformers import Qwen3OmniMoeForConditionalGeneration as Omni

    def forward(self, *args, **kwargs):
        return self.thinker(*args, **kwargs)

    def from_config(cls, config, trust_remote_code: bool = False, **kwargs):  # as an Auto class has it
        return cls._from_config(config, **kwargs)

    members = {"forward": forward, "from_config": classmethod(from_config), "__module__": __name__}
    return type(Omni.__name__, (Omni,), members)


@register_adapter
class Qwen3OmniMoeAdapter(Qwen3VLMoeAdapter):
    """Qwen3-Omni-MoE: the thinker (audio and vision towers before a Qwen3-MoE text decoder with DeepStack features)
    is compressed; audio tokens count as a third modality. The talker, a second MoE that speaks, is kept as it is
    (a checkpoint with `enable_audio_output` false has none)."""

    model_types = ("qwen3_omni_moe",)

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.thinker.model.language_model

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return bool(router.norm_topk_prob)

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        c = model.config.thinker_config
        return (input_ids == c.image_token_id) | (input_ids == c.video_token_id)

    def audio_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == model.config.thinker_config.audio_token_id

    def set_num_experts(self, model: nn.Module, num_experts: int) -> None:
        model.config.thinker_config.text_config.num_experts = num_experts

    def set_expert_intermediate_size(self, model: nn.Module, size: int) -> None:
        model.config.thinker_config.text_config.moe_intermediate_size = size

    def auto_model_class(self):
        return _omni_class()
