"""Registers "moecompress" with transformers, so `AutoModelForCausalLM.from_pretrained(packed_dir)` works
once moecompress is imported: the quantizer swaps each listed fused-experts module for a `PackedExperts`
on the meta device before the weights are read."""

from __future__ import annotations

from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..models.base import PROJECTIONS
from ..quant.qtensor import QuantFormat
from ..runtime.packed_experts import PackedExperts
from .checkpoint import FORMAT_VERSION, QUANT_METHOD


@register_quantization_config(QUANT_METHOD)
class MoECompressConfig(QuantizationConfigMixin):
    def __init__(self, formats: list[dict] | None = None, experts: dict[str, list[list[int]]] | None = None,
                 format_version: int = FORMAT_VERSION, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.formats = formats or []
        self.experts = experts or {}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "formats": self.formats, "experts": self.experts}


@register_quantizer(QUANT_METHOD)
class MoECompressHfQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        formats = [QuantFormat.from_dict(f) for f in self.quantization_config.formats]
        for name, rows in self.quantization_config.experts.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            fused = getattr(parent, child)
            hidden, intermediate = fused.down_proj.shape[1], fused.down_proj.shape[2]
            per_expert = [dict(zip(PROJECTIONS, (formats[i] for i in row))) for row in rows]
            setattr(parent, child, PackedExperts(hidden, intermediate, per_expert, fused.act_fn))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # The checkpoint stores the in-memory (already fused/renamed) names: no conversion applies.
        return []

    def is_serializable(self, **kwargs) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False
