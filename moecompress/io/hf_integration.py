"""Registers "moecompress" with transformers, so `AutoModelForCausalLM.from_pretrained(packed_dir)` works
once moecompress is imported: the quantizer swaps each listed fused-experts module for a `PackedExperts`
on the meta device before the weights are read."""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..models.base import PROJECTIONS
from ..quant.qtensor import QuantFormat
from ..runtime.packed_experts import PackedExperts
from .checkpoint import FORMAT_VERSION, QUANT_METHOD


@register_quantization_config(QUANT_METHOD)
class MoECompressConfig(QuantizationConfigMixin):
    def __init__(self, formats: list[dict] | None = None, experts: dict[str, list[list[int]]] | None = None,
                 format_version: int = FORMAT_VERSION, expert_maps: dict[str, list[int]] | None = None,
                 dynamic_skip: dict | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.formats = formats or []
        self.experts = experts or {}
        self.expert_maps = expert_maps or {}
        self.dynamic_skip = dynamic_skip

    def to_dict(self) -> dict[str, Any]:
        extra = {"expert_maps": self.expert_maps} if self.expert_maps else {}
        if self.dynamic_skip:
            extra["dynamic_skip"] = self.dynamic_skip
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "formats": self.formats, "experts": self.experts, **extra}


@register_quantizer(QUANT_METHOD)
class MoECompressHfQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        from torch import nn

        from ..merge.apply import MappedExperts

        for name, slot_map in self.quantization_config.expert_maps.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            fused, kept = getattr(parent, child), max(slot_map) + 1
            for param in ("gate_up_proj", "down_proj"):
                shape = getattr(fused, param).shape
                setattr(fused, param, nn.Parameter(torch.empty(kept, *shape[1:], device="meta"), requires_grad=False))
            fused.num_experts = kept
            setattr(parent, child, MappedExperts(fused, torch.tensor(slot_map)))
        formats = [QuantFormat.from_dict(f) for f in self.quantization_config.formats]
        for name, rows in self.quantization_config.experts.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            fused = getattr(parent, child)
            hidden, intermediate = fused.down_proj.shape[1], fused.down_proj.shape[2]
            per_expert = [dict(zip(PROJECTIONS, (formats[i] for i in row))) for row in rows]
            setattr(parent, child, PackedExperts(hidden, intermediate, per_expert, fused.act_fn))
        skip = self.quantization_config.dynamic_skip
        if skip and skip["method"] == "learned":
            from ..dynamic.skip import add_predictor_modules
            from ..models import get_adapter

            add_predictor_modules(model, get_adapter(model.config.model_type))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Non-persistent buffers created on the meta device are materialised empty: set the maps again.
        for name, slot_map in self.quantization_config.expert_maps.items():
            mapped = model.get_submodule(name)
            mapped.slot_map = torch.tensor(slot_map, device=mapped.experts.down_proj.device)
        if self.quantization_config.dynamic_skip:
            from ..dynamic.skip import SkipRule, install_skipping
            from ..models import get_adapter

            install_skipping(model, get_adapter(model.config.model_type), SkipRule.from_dict(self.quantization_config.dynamic_skip))
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # The checkpoint stores the in-memory (already fused/renamed) names: no conversion applies.
        return []

    def is_serializable(self, **kwargs) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False
