"""Efficiency of a (packed) model: bytes, bits per parameter, active parameters per token, expert activation
ratio, load time and tokens/s of the path the model runs on (the pure-PyTorch reference path on CPU)."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.base import ModelAdapter
from ..runtime.decode import Decoder
from ..runtime.native_linear import dense_kernels
from ..runtime.packed_experts import ExpertList, PackedLinear


@dataclass
class Efficiency:
    checkpoint_bytes: int  # weight files (*.safetensors) of the folder
    total_params: int
    bits_per_param: float  # 8 * checkpoint_bytes / total_params
    expert_params: int  # routed experts, all layers
    expert_bits_per_param: float  # stored bits of the routed experts (codes + scales + zeros) per parameter
    active_params_per_token: float  # everything but the routed experts a token does not run
    expert_activation_ratio: float  # routed expert activations per token / routed experts per layer
    expert_activations_skipped: float
    load_seconds: float | None
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # greedy steps after a 64-token prompt, static KV cache (`runtime/decode.py`)
    first_token_seconds: float  # the 64-token prompt's forward
    compile_seconds: float  # the decode step's compilation (or loading it from inductor's cache); 0 eager
    decode_path: str
    device: str
    expert_kernels: str = ""  # which code ran the routed experts (native-avx2, torch, dense grouped_mm ...)
    dense_kernels: str = ""  # which code ran the unquantized linear layers (torch, native-avx512 dense GEMV)

    def to_dict(self) -> dict:
        return asdict(self)


def _module_params(module: nn.Module, itemsize: int) -> tuple[int, int]:
    """(parameters, stored bytes) counting each PackedLinear as its dense out x in weight and every other
    parameter at `itemsize` bytes (the checkpoint dtype, not the dtype it was loaded in)."""
    params = sum(p.numel() for p in module.parameters())
    nbytes = params * itemsize
    for m in module.modules():
        if isinstance(m, PackedLinear):
            params += m.out_features * m.in_features
            nbytes += m.packed().nbytes
    return params, nbytes


def _stored_experts(experts: nn.Module) -> int:
    inner = getattr(experts, "experts", experts)  # MappedExperts wraps the merged experts
    return len(inner) if isinstance(inner, ExpertList) else int(inner.num_experts)


def stored_itemsize(folder: str | Path) -> int:
    """Bytes per unquantized parameter in the checkpoint, from its config.json (bf16 when not stated)."""
    config = Path(folder).expanduser() / "config.json"
    data = json.loads(config.read_text()) if config.is_file() else {}
    dtype = data.get("dtype") or data.get("torch_dtype")
    return torch.empty(0, dtype=getattr(torch, dtype or "bfloat16")).element_size()


def parameter_budget(model: nn.Module, adapter: ModelAdapter, itemsize: int = 2, skipped: float = 0.0) -> dict:
    total = _module_params(model, itemsize)[0]
    expert_params = expert_bytes = 0
    active = float(total)
    ratios = []
    for view in adapter.moe_blocks(model):
        params, nbytes = _module_params(view.experts, itemsize)
        expert_params += params
        expert_bytes += nbytes
        runs = view.top_k * (1.0 - skipped)
        active -= params - params / _stored_experts(view.experts) * runs
        ratios.append(runs / view.num_experts)
    return {
        "total_params": total,
        "expert_params": expert_params,
        "expert_bits_per_param": 8 * expert_bytes / max(expert_params, 1),
        "active_params_per_token": active,
        "expert_activation_ratio": statistics.fmean(ratios) if ratios else 1.0,
    }


def checkpoint_bytes(folder: str | Path) -> int:
    path = Path(folder).expanduser()
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


@torch.no_grad()
def measure_efficiency(
    model: nn.Module,
    adapter: ModelAdapter,
    folder: str | Path,
    tokens: torch.Tensor,
    load_seconds: float | None = None,
    prefill_len: int = 512,
    decode_tokens: int = 32,
    repeats: int = 3,
    compile_decode: bool = True,
) -> Efficiency:
    """`tokens`: a 1-D stream of real text (the skip ratio is measured on it)."""
    device = next(model.parameters()).device
    prompt = tokens[:prefill_len][None].to(device)
    controller = getattr(model, "skip_controller", None)
    model(input_ids=prompt, use_cache=False)  # warm-up
    if controller is not None:
        controller.reset_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=prompt, use_cache=False)
        times.append(time.perf_counter() - start)
    skipped = controller.stats.skipped() if controller is not None else 0.0
    decoder = Decoder(model, 64 + decode_tokens, compile=compile_decode)
    _, first = decoder.generate(prompt[0, :64], decode_tokens)  # compiles, or loads the compiled graph
    _, decode = decoder.generate(prompt[0, :64], decode_tokens)
    budget = parameter_budget(model, adapter, stored_itemsize(folder), skipped)
    size = checkpoint_bytes(folder)
    return Efficiency(
        checkpoint_bytes=size,
        bits_per_param=8 * size / budget["total_params"],
        expert_activations_skipped=skipped,
        load_seconds=load_seconds,
        prefill_tokens_per_s=prompt.shape[1] / statistics.median(times),
        decode_tokens_per_s=decode.tokens_per_s,
        first_token_seconds=decode.prefill_s,
        compile_seconds=first.compile_s,
        decode_path=decode.path,
        device=str(device),
        expert_kernels=expert_kernels(model),
        dense_kernels=dense_kernels(model),
        **budget,
    )


def expert_kernels(model: nn.Module) -> str:
    """What runs the routed experts: for packed ones the kernel path, for dense ones transformers' experts
    implementation and the weights' dtype."""
    from ..runtime import cuda_kernels, native
    from ..runtime.factored_experts import FactoredExperts
    from ..runtime.packed_experts import PackedExperts

    factored = next((m for m in model.modules() if isinstance(m, FactoredExperts)), None)
    if factored is not None:
        native_gemv = next(factored.buffers()).device.type == "cpu" and native.library() is not None
        return f"factored: {native.kernel_name() + ' GEMV' if native_gemv else 'torch dequant+matmul'}"
    packed = next((m for m in model.modules() if isinstance(m, PackedExperts)), None)
    if packed is not None:
        device = next(packed.buffers()).device.type
        names = {"cpu": native.kernel_name, "cuda": cuda_kernels.kernel_name}
        return f"packed: {names[device]() if device in names else 'torch dequant+matmul'}"
    impl = getattr(model.config, "_experts_implementation", None) or "eager"
    return f"dense {impl} ({next(model.parameters()).dtype})".replace("torch.", "")
