"""Adapter registry: one file per architecture registers itself here by `model_type`. Every module of this package
is imported on first use (a new architecture is one file); third-party adapters come from the entry point group
`moecompress.adapters` (a `ModelAdapter` subclass or a module registering some) or from `load_plugin("module:Class")`
(the CLI's `--adapter`)."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from ..errors import UnsupportedModelError
from .base import ModelAdapter
from .generic import GenericAdapter, has_experts_interface

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "moecompress.adapters"
_ADAPTERS: dict[str, type[ModelAdapter]] = {}
_NOT_ADAPTERS = {"base", "generic", "loading", "registry", "streaming"}
_discovered = False
_discovering = threading.RLock()  # re-entrant: a plugin being imported may ask the registry
_in_discovery = False  # only the thread holding the lock can see it True


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def _discover() -> None:
    """Import the adapter files of this package, then the installed plugins' entry points (once). Thread-safe:
    a thread arriving while another discovers waits until every adapter is registered."""
    global _discovered, _in_discovery
    if _discovered:
        return
    with _discovering:
        if _discovered or _in_discovery:  # done by the thread this one waited for, or asked from a plugin import
            return
        _in_discovery = True
        try:
            _import_adapters()
            _discovered = True
        finally:
            _in_discovery = False


def _import_adapters() -> None:
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in _NOT_ADAPTERS and not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            _register_loaded(point.load(), point.value)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the built-in adapters down
            log.warning("the adapter plugin '%s' (%s) failed to load, skipped: %s", point.name, point.value, exc)


def _register_loaded(obj, where: str) -> None:
    if isinstance(obj, type) and issubclass(obj, ModelAdapter):
        if not obj.model_types:
            raise UnsupportedModelError(f"adapter {where} names no model_types; set model_types = ('...',).")
        register_adapter(obj)
    elif not isinstance(obj, ModuleType):
        raise UnsupportedModelError(f"{where} is neither a ModelAdapter subclass nor a module registering adapters.")


def load_plugin(spec: str) -> type[ModelAdapter] | None:
    """Register the adapter `module:Class` (or every adapter `module` registers); the CLI's `--adapter`."""
    _discover()  # built-ins first: a plugin may replace one
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        obj = getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as exc:
        raise UnsupportedModelError(
            f"--adapter {spec}: {exc}; give an importable module:Class (is the plugin installed, or on PYTHONPATH?)."
        ) from None
    _register_loaded(obj, spec)
    return obj if attr else None


def supported_model_types() -> list[str]:
    _discover()
    return sorted(_ADAPTERS)


def get_adapter(model_type: str) -> ModelAdapter:
    """The family file's adapter of `model_type`, else the generic one where transformers builds its experts with
    `use_experts_implementation` (any MoE family of transformers, also one registered at run time)."""
    _discover()
    if model_type in _ADAPTERS:
        return _ADAPTERS[model_type]()
    if has_experts_interface(model_type):
        return GenericAdapter(model_type)
    raise UnsupportedModelError(
        f"model_type '{model_type}' is not a Mixture-of-Experts that transformers builds with its experts interface "
        f"(use_experts_implementation), and no family file claims it (files for: {', '.join(supported_model_types())}"
        "). A new architecture is one file in moecompress/models/, or a plugin: --adapter module:Class or the "
        f"'{ENTRY_POINT_GROUP}' entry point."
    )
