"""Load a model (local folder or hub id) with its adapter, with errors that say what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import ModelLoadError, NonFiniteError, UnsupportedModelError
from .base import PROJECTIONS, ModelAdapter
from .registry import get_adapter, supported_model_types


@dataclass
class LoadedModel:
    model: nn.Module
    adapter: ModelAdapter
    source: str


def _looks_like_path(source: str) -> bool:
    """Hub ids are `org/name`; anything else (or anything that exists) is a local path. A bare `name` that is no
    local folder is reported here instead of being looked up on the Hub (every MoE there has an org)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


def read_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if folder.is_file():
            raise ModelLoadError(f"'{source}' is a file; pass the model folder that holds config.json and the weights.")
        if not folder.is_dir():
            raise ModelLoadError(f"model folder '{source}' does not exist. Pass an existing folder or a hub id (org/name).")
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"'{source}' has no config.json, so it is not a transformers model folder.")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(
            f"could not read the config of '{source}': {exc}. Check the path or hub id, network access, "
            "and HF_TOKEN for gated models."
        ) from exc


def load_model(
    source: str,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load `source` (folder or hub id) in `dtype`; raise if it is not a supported MoE."""
    config = read_config(source, trust_remote_code)
    adapter = get_adapter(config.model_type)
    try:
        model = adapter.auto_model_class().from_pretrained(
            source, dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(f"could not load the weights of '{source}': {' '.join(str(exc).split())}. Re-download "
                             "the model (a weight file is truncated or damaged?).") from exc
    model.eval()
    require_moe(model, adapter, source)
    require_finite(model, adapter, source)
    return LoadedModel(model, adapter, source)


def require_finite(model: nn.Module, adapter: ModelAdapter, source: str) -> None:
    """Refuse a source with NaN/Inf weights, naming the tensor (layer, expert and projection for experts)."""
    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if not bad:
        return
    for view in adapter.moe_blocks(model):
        for e in range(view.num_experts):
            weights = view.expert_weights(e)
            for proj in PROJECTIONS:
                if not bool(torch.isfinite(weights[proj]).all()):
                    raise NonFiniteError(f"'{source}': layer {view.layer_index} expert {e} {proj} holds NaN/Inf values; "
                                         "fix or re-download the source model.")
    raise NonFiniteError(f"'{source}': {bad[0]} holds NaN/Inf values; fix or re-download the source model.")


def require_moe(model: nn.Module, adapter: ModelAdapter, source: str) -> None:
    if not adapter.moe_blocks(model):
        raise UnsupportedModelError(
            f"'{source}' has no sparse MoE layers to compress. Supported MoE architectures: "
            f"{', '.join(supported_model_types())}."
        )
