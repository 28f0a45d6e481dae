"""Registers "moecompress" with transformers, so `AutoModelForCausalLM.from_pretrained(packed_dir)` works
once moecompress is imported: the quantizer swaps each listed fused-experts module for a `PackedExperts`
on the meta device before the weights are read."""

from __future__ import annotations

import itertools
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from ..formats import QuantFormat
from ..models.base import PROJECTIONS
from ..runtime.factored_experts import FactoredExperts
from ..runtime.packed_experts import PackedExperts
from ..runtime.quantized_linear import install_quantized_linear
from ..storage.outputs import MANIFEST
from .integrity import (
    FORMAT_VERSION,
    QUANT_METHOD,
    check_model_against_files,
    verify_checkpoint_files,
)

# moecompress.load(verify=False) turns the sha256 check off for its own from_pretrained call.
_verify_hashes: ContextVar[bool] = ContextVar("moecompress_verify_hashes", default=True)


def _checkpoint_folder(checkpoint_files: list[str] | None, name_or_path: str) -> Path:
    """The folder holding the weight files and the manifest; a Hub repo's manifest is fetched beside them."""
    if not checkpoint_files:
        raise CheckpointError("a moecompress checkpoint is loaded from its safetensors files; none were found.")
    folder = Path(checkpoint_files[0]).parent
    if (folder / MANIFEST).is_file() or Path(name_or_path).expanduser().exists():
        return folder
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, MANIFEST)).parent
    except Exception as exc:  # offline, missing file, auth: any of them means no manifest to verify against
        raise CheckpointError(
            f"'{name_or_path}' has no {MANIFEST} beside its weights ({type(exc).__name__}); "
            "download the whole repository (snapshot_download) and load the folder."
        ) from exc


@register_quantization_config(QUANT_METHOD)
class MoECompressConfig(QuantizationConfigMixin):
    def __init__(
        self,
        formats: list[dict] | None = None,
        experts: dict[str, list[list[int]]] | None = None,
        format_version: int = FORMAT_VERSION,
        expert_maps: dict[str, list[int]] | None = None,
        dynamic_skip: dict | None = None,
        factored: dict[str, dict] | None = None,
        linears: dict[str, int] | None = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.formats = formats or []
        self.experts = experts or {}
        self.expert_maps = expert_maps or {}
        self.dynamic_skip = dynamic_skip
        self.factored = factored or {}
        self.linears = linears or {}

    def to_dict(self) -> dict[str, Any]:
        extra = {"expert_maps": self.expert_maps} if self.expert_maps else {}
        if self.factored:
            extra["factored"] = self.factored
        if self.dynamic_skip:
            extra["dynamic_skip"] = self.dynamic_skip
        if self.linears:
            extra["linears"] = self.linears
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "formats": self.formats,
            "experts": self.experts,
            **extra,
        }


@register_quantizer(QUANT_METHOD)
class MoECompressHfQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        from torch import nn

        from ..models import get_adapter
        from ..runtime.packed_experts import MappedExperts

        folder = _checkpoint_folder(checkpoint_files, getattr(model.config, "_name_or_path", ""))
        manifest, stored = verify_checkpoint_files(folder, check_hashes=_verify_hashes.get())  # before building
        _require_modules(model, self.quantization_config, folder)
        adapter = get_adapter(model.config.model_type)
        adapter.moe_blocks(model)  # blocks take the common experts call before their experts are replaced (Llama 4)
        for name, slot_map in self.quantization_config.expert_maps.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            fused, kept = getattr(parent, child), max(slot_map) + 1
            for param, tensor in list(fused.named_parameters(recurse=False)):  # every expert tensor: [E, ...]
                shape = tensor.shape
                setattr(fused, param, nn.Parameter(torch.empty(kept, *shape[1:], device="meta"), requires_grad=False))
            fused.num_experts = kept
            setattr(parent, child, MappedExperts(fused, torch.tensor(slot_map)))
        formats = [QuantFormat.from_dict(f) for f in self.quantization_config.formats]
        for name, rows in self.quantization_config.experts.items():
            _swap_experts(model, name, lambda fused, rows=rows: _packed_experts(adapter, fused, rows, formats))
        for name, layout in self.quantization_config.factored.items():
            _swap_experts(model, name, lambda fused, layout=layout: _factored_experts(adapter, fused, layout, formats))
        for name, index in self.quantization_config.linears.items():
            install_quantized_linear(model, name, formats[index])
        skip = self.quantization_config.dynamic_skip
        if skip and skip["method"] == "learned":
            from ..dynamic.skip import add_predictor_modules

            add_predictor_modules(model, adapter)
        guard = manifest.get("guard")
        check_model_against_files(model, stored, folder, guard)
        if guard is not None:  # the tensor that stops a plain load is not one of this model's
            model._keys_to_ignore_on_load_unexpected = {
                *(model._keys_to_ignore_on_load_unexpected or ()),
                re.escape(guard),
            }
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Non-persistent buffers created on the meta device are materialised empty: set the maps again.
        for name, slot_map in self.quantization_config.expert_maps.items():
            mapped = model.get_submodule(name)
            device = next(itertools.chain(mapped.experts.parameters(), mapped.experts.buffers())).device
            mapped.slot_map = torch.tensor(slot_map, device=device)
        if self.quantization_config.dynamic_skip:
            from ..dynamic.skip import SkipRule, install_skipping
            from ..models import get_adapter

            install_skipping(
                model, get_adapter(model.config.model_type), SkipRule.from_dict(self.quantization_config.dynamic_skip)
            )
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # The checkpoint stores the in-memory (already fused/renamed) names: no conversion applies.
        return []

    def is_serializable(self, **kwargs) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _require_modules(model, qc: MoECompressConfig, folder: Path) -> None:
    """Every module that quantization_config rebuilds exists in the model config.json describes."""
    for name in [*qc.experts, *qc.factored, *qc.expert_maps, *qc.linears]:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{folder / 'config.json'}: quantization_config names the module {name}, which this "
                f"{model.config.model_type} model does not have; restore the original config.json."
            ) from None


def _swap_experts(model, name: str, make) -> None:
    """Replace the fused experts module `name` with `make(fused)`, built on the meta device: the packed tensors go
    straight from the files into its buffers."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    with torch.device("meta"):
        setattr(parent, child, make(getattr(parent, child)))


def _packed_experts(adapter, fused, rows: list[list[int]], formats: list[QuantFormat]) -> PackedExperts:
    first = adapter.expert_weights(fused, 0)  # the architecture's layout, on the meta device
    per_expert = [dict(zip(PROJECTIONS, (formats[i] for i in row))) for row in rows]
    bias = first.gate_bias is not None
    return PackedExperts(*first.down_proj.shape, per_expert, adapter.expert_activation(fused), bias)


def _factored_experts(adapter, fused, layout: dict, formats: list[QuantFormat]) -> FactoredExperts:
    first = adapter.expert_weights(fused, 0)
    base = {p: formats[i] for p, i in zip(PROJECTIONS, layout["base"])} if layout["base"] else None
    deltas = [
        {p: (r, *(None if i is None else formats[i] for i in ab)) for p, (r, *ab) in zip(PROJECTIONS, row)}
        for row in layout["deltas"]
    ]
    return FactoredExperts(*first.down_proj.shape, base, deltas, adapter.expert_activation(fused))
