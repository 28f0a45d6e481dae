"""Model adapters: every file of this package but base, loading, registry and streaming is one architecture,
found by `registry` on first use; plugins add more."""

from .base import MODALITIES, PROJECTIONS, ExpertWeights, ModelAdapter, MoEBlockView
from .loading import LoadedModel, load_model, read_config
from .registry import get_adapter, load_plugin, register_adapter, supported_model_types

__all__ = [
    "MODALITIES",
    "PROJECTIONS",
    "ExpertWeights",
    "LoadedModel",
    "ModelAdapter",
    "MoEBlockView",
    "get_adapter",
    "load_plugin",
    "load_model",
    "read_config",
    "register_adapter",
    "supported_model_types",
]
