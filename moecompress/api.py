"""Public Python API: `compress` a model, `load` a compressed checkpoint."""

from __future__ import annotations

from .io.loader import load
from .pipeline import compress

__all__ = ["compress", "load"]
