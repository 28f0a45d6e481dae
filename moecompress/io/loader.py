"""Load a moecompress checkpoint folder as a transformers model whose experts run through the packed modules."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models import get_adapter
from ..runtime.packed_experts import set_dequant_cache
from .checkpoint import read_manifest
from .integrity import read_config


def load(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    verify: bool = True,
    cache_dequantized: bool = False,
    trust_remote_code: bool = False,
    dense_kernels: bool = True,
    dense_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild a model from a moecompress checkpoint folder; experts run through the packed modules.

    verify: check every weight file's sha256 against the manifest (sizes, tensor names and shapes, and the
    config's quantization section are always checked, whatever the loader).
    cache_dequantized: keep dequantized expert weights after first use (fast CPU eval, more memory).
    dense_kernels: run the unquantized linear layers (attention, LM head) through the native dense GEMV on the CPU
    at decode (`runtime/native_linear.py`: same weights, no copy, float32 sums); False: torch's `F.linear`.
    dense_dtype: with `dense_kernels`, those layers' weights kept in this dtype (torch.bfloat16: as a bfloat16
    checkpoint stores them, half the bytes of float32 read at each decode step; the activations stay in `dtype`).
    """
    from transformers import AutoConfig

    from . import hf_integration  # registers the quantizer, which verifies the checkpoint

    read_manifest(path)  # a missing folder or manifest is reported before transformers looks at it
    read_config(Path(path).expanduser())  # without its quantization section transformers would load random experts
    token = hf_integration._verify_hashes.set(verify)
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = (
            get_adapter(config.model_type)
            .auto_model_class()
            .from_pretrained(str(path), dtype=dtype, device_map=device_map, trust_remote_code=trust_remote_code)
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"could not load the checkpoint '{path}': {exc}") from exc
    finally:
        hf_integration._verify_hashes.reset(token)
    model.eval()
    set_dequant_cache(model, cache_dequantized)
    if dense_kernels:
        from ..runtime.native_linear import use_native_linears

        if use_native_linears(model) and dense_dtype is not None:
            from ..runtime.native_linear import NativeLinear

            for module in model.modules():
                if isinstance(module, NativeLinear):
                    module.weight.data = module.weight.data.to(dense_dtype)
    return model
