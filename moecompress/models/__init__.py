"""Model adapters. Importing this package registers every adapter file."""

from . import deepseek_v3, mixtral, olmoe, qwen2_moe, qwen3_moe, qwen3_vl_moe  # noqa: F401
from .base import MODALITIES, PROJECTIONS, ExpertWeights, ModelAdapter, MoEBlockView
from .loading import LoadedModel, load_model, read_config
from .registry import get_adapter, register_adapter, supported_model_types

__all__ = [
    "MODALITIES",
    "PROJECTIONS",
    "ExpertWeights",
    "LoadedModel",
    "ModelAdapter",
    "MoEBlockView",
    "get_adapter",
    "load_model",
    "read_config",
    "register_adapter",
    "supported_model_types",
]
