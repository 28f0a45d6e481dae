"""Adapter registry: one file per architecture registers itself here by `model_type`."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import ModelAdapter

_ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model_type: str) -> ModelAdapter:
    try:
        return _ADAPTERS[model_type]()
    except KeyError:
        raise UnsupportedModelError(
            f"model_type '{model_type}' has no moecompress adapter. Supported: {', '.join(supported_model_types())}. "
            "A new architecture is one file in moecompress/models/ registering a ModelAdapter."
        ) from None
