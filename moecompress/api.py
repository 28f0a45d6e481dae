"""Public Python API."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError
from .io.checkpoint import verify_checkpoint
from .models import get_adapter
from .pipeline import compress, set_dequant_cache

__all__ = ["compress", "load"]


def load(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    verify: bool = True,
    cache_dequantized: bool = False,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild a model from a moecompress checkpoint folder; experts run through the packed modules.

    verify: check every weight file against the manifest's size and sha256 first.
    cache_dequantized: keep dequantized expert weights after first use (fast CPU eval, more memory).
    """
    from transformers import AutoConfig

    from .io import hf_integration  # noqa: F401  registers the quantizer

    verify_checkpoint(path, check_hashes=verify)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    adapter = get_adapter(config.model_type)
    try:
        model = adapter.auto_model_class().from_pretrained(
            str(path), dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"could not load the checkpoint '{path}': {exc}") from exc
    model.eval()
    set_dequant_cache(model, cache_dequantized)
    return model
