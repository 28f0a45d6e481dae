"""Load a model (local folder or hub id) with its adapter, with errors that say what to do."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ModelLoadError, NonFiniteError, UnsupportedModelError
from ..storage.tensorfiles import StoredTensor, TensorFileError, read_header
from .base import PROJECTIONS, ModelAdapter
from .registry import get_adapter, supported_model_types


@dataclass
class LoadedModel:
    """A model in memory with its adapter. The layer walk of calibration asks it for one decoder layer at a time
    (`load_layer` / `release_layer`); here every layer is resident and only moved to the compute device and back.
    `streaming.StreamedModel` reads each layer from disk instead."""

    model: nn.Module
    adapter: ModelAdapter
    source: str

    def prepare_layers(self, device: str | torch.device) -> None:
        """Put everything outside the decoder layers (embeddings, vision tower, rotary tables) on `device`."""
        layers = self.adapter.decoder_layers(self.model)
        inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            if id(tensor) not in inside:
                tensor.data = tensor.data.to(device)

    def after_capture(self) -> None:
        """The first layer's inputs are captured: what lies outside the layers may be freed (a streamed model does)."""

    def load_layer(self, index: int, device: str | torch.device) -> nn.Module:
        return self.adapter.decoder_layers(self.model)[index].to(device)

    def release_layer(self, index: int, changed: bool = False) -> None:
        self.adapter.decoder_layers(self.model)[index].to("cpu")

    def trim(self) -> None:
        """Between the steps of a layer: give freed memory back to the OS (a streamed model does)."""


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
            raise ModelLoadError(
                f"model folder '{source}' does not exist. Pass an existing folder or a hub id (org/name)."
            )
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"'{source}' has no config.json, so it is not a transformers model folder.")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(
            f"could not read the config of '{source}': {exc}. Check the path or hub id, network access, "
            "and HF_TOKEN for gated models."
        ) from exc


def dequantizing_config(config, source: str):
    """For a pre-quantized source (GPT-OSS in MXFP4, DeepSeek-V3 and Kimi-K2 in FP8), its quantization config set to
    make transformers dequantize each tensor as it is read; None for an unquantized source."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:
        qc = AutoQuantizationConfig.from_dict(dict(qc)) if isinstance(qc, dict) else qc
    except ValueError as exc:
        raise ModelLoadError(f"'{source}': {' '.join(str(exc).split())}") from None
    if not hasattr(qc, "dequantize"):
        method = getattr(qc.quant_method, "value", qc.quant_method)
        raise ModelLoadError(
            f"'{source}' is quantized with {method}, which transformers cannot dequantize while loading; pass the "
            "unquantized (bf16/fp16) model."
        )
    qc.dequantize = True
    return qc


def load_model(
    source: str,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    **placement,
) -> LoadedModel:
    """Load `source` (folder or hub id) in `dtype`, dequantized if it is stored quantized (MXFP4, FP8); raise if it
    is not a supported MoE. `placement`: accelerate's big-model arguments of `from_pretrained` (max_memory,
    offload_folder)."""
    config = read_config(source, trust_remote_code)
    adapter = get_adapter(config.model_type)
    quantized = dequantizing_config(config, source)
    if quantized is not None:
        placement["quantization_config"] = quantized
    elif Path(source).expanduser().is_dir():  # transformers would cast integer weights to float silently
        try:
            tensors = source_tensors(Path(source).expanduser())
        except ModelLoadError:  # no safetensors, or damaged ones: transformers reports what it finds
            tensors = {}
        require_float_weights(tensors, source)
    try:
        model, info = adapter.auto_model_class().from_pretrained(
            source,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
            **placement,
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelLoadError(
            f"could not load the weights of '{source}': {' '.join(str(exc).split())}. Re-download "
            "the model (a weight file is truncated or damaged?)."
        ) from exc
    model.eval()
    head = model.get_output_embeddings()
    head_names = {n for n, p in model.named_parameters() if head is not None and any(p is q for q in head.parameters())}
    require_untied_head(model, sorted(head_names & set(info["missing_keys"])), source)
    require_moe(model, adapter, source)
    require_finite(model, adapter, source)
    return LoadedModel(model, adapter, source)


def source_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint in `folder`, after checking that each shard the index names exists, is
    complete, and holds what the index says it holds."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({exc}); re-download the model.") from exc
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise ModelLoadError(
            f"'{folder}' has no safetensors weights (model.safetensors or model.safetensors."
            "index.json); convert the checkpoint to safetensors, or pass --no-stream."
        )
    tensors: dict[str, StoredTensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise ModelLoadError(
                f"weight file {folder / name}, named by {index.name}, is missing; re-download the model."
            )
        try:
            header = read_header(folder / name)
        except TensorFileError as exc:
            raise ModelLoadError(f"could not load the weights of '{folder}': {exc}; re-download the model.") from exc
        twice = next((key for key in header if key in tensors), None)
        if twice is not None:
            raise ModelLoadError(
                f"'{twice}' is stored twice, in {tensors[twice].file.name} and {name}: the shards of '{folder}' "
                "overlap; re-download the model or remove the stray file."
            )
        tensors.update(header)
    for key, name in (weight_map or {}).items():
        if key not in tensors or tensors[key].file.name != name:
            raise ModelLoadError(f"{index} puts '{key}' in {name}, which does not hold it; re-download the model.")
    return tensors


def require_float_weights(tensors: dict[str, StoredTensor], source: str) -> None:
    """A source that declares no quantization stores its weights as floating point (F*, BF16)."""
    bad = next(
        (t for t in tensors.values() if t.name.endswith(".weight") and not t.dtype.startswith(("F", "BF"))), None
    )
    if bad is not None:
        raise ModelLoadError(
            f"'{source}' stores {bad.name} as {bad.dtype}, an integer type, and config.json declares no quantization: "
            "re-download the model, or convert that weight to floating point."
        )


def require_untied_head(model: nn.Module, missing: list[str], source: str) -> None:
    """An untied output head with no stored weight (`missing`: its parameters) would be left random."""
    if missing:
        raise ModelLoadError(
            f"'{source}' stores no weight for {missing[0]}, and config.json unties the LM head "
            "(tie_word_embeddings: false): re-download the model, or fix its config.json."
        )


def require_finite(model: nn.Module, adapter: ModelAdapter, source: str) -> None:
    """Refuse a source with NaN/Inf weights, naming the tensor (layer, expert and projection for experts)."""
    bad = _non_finite(model)
    if bad:
        _raise_non_finite(adapter.moe_blocks(model), source, bad[0])


def require_finite_layer(loaded: LoadedModel, index: int) -> None:
    """`require_finite` for decoder layer `index` alone (the layer a streamed model just read)."""
    prefix = loaded.adapter.layers_prefix(loaded.model)
    bad = _non_finite(loaded.adapter.decoder_layers(loaded.model)[index], f"{prefix}.{index}.")
    if bad:
        views = loaded.adapter.moe_blocks_by_layer(loaded.model).get(index, [])
        _raise_non_finite(views, loaded.source, bad[0])


def require_finite_outside(module: nn.Module, source: str) -> None:
    """`require_finite` for the loaded weights of `module` outside the experts (embeddings, norms, LM head)."""
    bad = _non_finite(module)
    if bad:
        raise NonFiniteError(f"'{source}': {bad[0]} holds NaN/Inf values; fix or re-download the source model.")


def _non_finite(module: nn.Module, prefix: str = "") -> list[str]:
    # parameters offloaded to disk by accelerate are on the meta device here: not readable, not checked
    return [
        prefix + n for n, p in module.named_parameters() if p.is_floating_point() and not p.is_meta and not _finite(p)
    ]


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`, without a bool copy of it (min and max propagate NaN)."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _raise_non_finite(views, source: str, first_bad: str) -> None:
    for view in views:
        for e in range(view.num_experts):
            weights = view.expert_weights(e)
            for proj in PROJECTIONS:
                if not bool(torch.isfinite(weights[proj]).all()):
                    raise NonFiniteError(
                        f"'{source}': layer {view.layer_index} expert {e} {proj} holds NaN/Inf values; "
                        "fix or re-download the source model."
                    )
    raise NonFiniteError(f"'{source}': {first_bad} holds NaN/Inf values; fix or re-download the source model.")


def require_moe(model: nn.Module, adapter: ModelAdapter, source: str) -> None:
    views = adapter.moe_blocks(model)
    if not views:
        raise UnsupportedModelError(
            f"'{source}' has no sparse MoE layers to compress. Supported: every MoE whose experts transformers builds "
            f"with use_experts_implementation, and the family files' {', '.join(supported_model_types())}."
        )
    view = views[0]
    if view.top_k > view.num_experts:
        raise ModelLoadError(
            f"'{source}': config.json routes each token to {view.top_k} experts of {view.num_experts} "
            "(num_experts_per_tok above the expert count); fix config.json."
        )


class LargeOnMeta(TorchFunctionMode):
    """Tensors of more than `limit` bytes made without a device are made on the meta device. `init_empty_weights`
    moves each parameter to meta only once it is made: a fused experts tensor larger than memory (DeepSeek-V3's
    gate_up, 30 GB in float32) would fail to allocate first. No buffer a model makes at init is near this size."""

    FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})

    def __init__(self, limit: int = 1 << 28):
        super().__init__()
        self.limit = limit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            sizes = args[0] if args and isinstance(args[0], (tuple, list)) else args
            if all(isinstance(n, int) for n in sizes):
                dtype = kwargs.get("dtype") or torch.get_default_dtype()
                if math.prod(sizes) * dtype.itemsize > self.limit:
                    kwargs["device"] = "meta"
        return func(*args, **kwargs)


@contextlib.contextmanager
def empty_weights():
    """Build a model's skeleton: parameters on the meta device (accelerate's `init_empty_weights`; buffers such as
    rotary tables real), none allocated first when larger than memory (`LargeOnMeta`)."""
    from accelerate import init_empty_weights

    with init_empty_weights(), LargeOnMeta():
        yield
