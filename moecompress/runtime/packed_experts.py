"""Routed experts stored bit-packed, with the pure-torch dequantize-then-matmul reference path.

Module layout (and so state-dict keys) follows the per-expert convention of GPTQ tools and
compressed-tensors: `experts.{e}.{gate_proj,up_proj,down_proj}.{weight_packed,weight_scale,weight_zero_point}`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import PackedTensor, QuantFormat, unpack
from ..models.base import PROJECTIONS, ExpertWeights, GatedActivation, MoEBlockView

_pack_epoch = 0  # bumped whenever packed weights are replaced in place


class PackedLinear(nn.Module):
    """A linear layer whose weight is a `PackedTensor` held as buffers (those its format stores), with a
    float `bias` where the architecture's experts have one (GPT-OSS)."""

    def __init__(self, out_features: int, in_features: int, fmt: QuantFormat, bias: bool = False):
        super().__init__()
        self.out_features, self.in_features, self.fmt = out_features, in_features, fmt
        stored = fmt.stored_shapes(out_features, in_features)
        self.stored = tuple(stored)  # the buffers the format stores
        for name, (shape, dtype) in stored.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._cache: torch.Tensor | None = None
        self.cache_dequantized = False
        self.method = "gptq"

    def packed(self) -> PackedTensor:
        return PackedTensor(self.stored_tensors(), (self.out_features, self.in_features), self.fmt)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.stored}

    def load_packed(self, packed: PackedTensor) -> None:
        global _pack_epoch
        if tuple(packed.shape) != (self.out_features, self.in_features) or packed.fmt != self.fmt:
            raise ValueError(f"packed tensor {packed.shape} {packed.fmt.name} does not fit {self}")
        for name, tensor in packed.tensors.items():
            getattr(self, name).copy_(tensor)
        self._cache = None
        _pack_epoch += 1  # native kernel tables built before this point may hold repacked copies: rebuild them

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._cache is not None and self._cache.dtype == dtype:
            return self._cache
        weight = unpack(self.packed()).dequantize(dtype)
        if self.cache_dequantized:
            self._cache = weight
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.fmt.name}"


class PackedExpert(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, formats: dict[str, QuantFormat], bias: bool = False):
        super().__init__()
        self.gate_proj = PackedLinear(intermediate_size, hidden_size, formats["gate_proj"], bias)
        self.up_proj = PackedLinear(intermediate_size, hidden_size, formats["up_proj"], bias)
        self.down_proj = PackedLinear(hidden_size, intermediate_size, formats["down_proj"], bias)


class ExpertList(nn.Module):
    """Routed experts as modules `{e}.{gate_proj,up_proj,down_proj}` whose projections are linear layers with a
    `dequantize(dtype)` method (and optional biases); `activation(gate, up)` makes the hidden state (an
    activation module like SiLU is taken as act(gate) * up). A drop-in replacement for a transformers v5 fused
    experts module: `forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`."""

    def __init__(self, experts: list[nn.Module], hidden_size: int, intermediate_size: int, activation: nn.Module):
        super().__init__()
        for e, expert in enumerate(experts):
            self.add_module(str(e), expert)
        self.num_experts = len(experts)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = activation if _is_gated(activation) else GatedActivation(activation)
        self.cache_dequantized = False

    def __getitem__(self, expert: int) -> PackedExpert:
        return self._modules[str(expert)]

    def __iter__(self):
        return (self[e] for e in range(self.num_experts))

    def __len__(self) -> int:
        return self.num_experts

    def formats(self) -> list[dict[str, QuantFormat]]:
        return [{p: getattr(expert, p).fmt for p in PROJECTIONS} for expert in self]

    def expert_weights(self, expert: int, dtype: torch.dtype = torch.float32) -> ExpertWeights:
        e = self[expert]
        biases = [getattr(getattr(e, p), "bias", None) for p in PROJECTIONS]
        return ExpertWeights(*(getattr(e, p).dequantize(dtype) for p in PROJECTIONS), *biases)

    def set_cache_dequantized(self, enabled: bool) -> None:
        self.cache_dequantized = enabled  # read on every forward by the kernel dispatch
        for module in self.modules():
            if isinstance(module, PackedLinear):
                module.cache_dequantized, module._cache = enabled, None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            tok, slot = torch.where(top_k_index == e)
            x = hidden_states[tok]
            expert = self[e]
            y = expert.down_proj(self.activation(expert.gate_proj(x), expert.up_proj(x)))
            out.index_add_(0, tok, (y * top_k_weights[tok, slot, None]).to(out.dtype))
        return out


class PackedExperts(ExpertList):
    """Routed experts whose projections are `PackedLinear`s. On CPU the native fused kernel runs
    (`runtime/native.py`; biases and GPT-OSS's clamped SwiGLU included), on CUDA devices the CUDA decode kernels and
    the Triton grouped GEMM (`runtime/cuda_kernels.py`; bias-free SwiGLU experts), where they are available, unless
    dequantized copies are cached (`set_cache_dequantized`, for evaluation) or gradients are needed; otherwise
    the torch reference path."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        formats: list[dict[str, QuantFormat]],
        activation: nn.Module,
        bias: bool = False,
    ):
        experts = [PackedExpert(hidden_size, intermediate_size, f, bias) for f in formats]
        super().__init__(experts, hidden_size, intermediate_size, activation)
        self.has_bias = bias
        self.kernel_formats = all(f.kernels for expert in formats for f in expert.values())
        from .decode import register

        self.registry_key = register(self)

    def _kernels_apply(self, hidden_states: torch.Tensor) -> bool:
        grad = torch.is_grad_enabled() and hidden_states.requires_grad
        # cached: evaluation with dense copies kept; formats no kernel reads (llama.cpp's) take the torch path
        return self.kernel_formats and not self.cache_dequantized and not grad

    def native_usable(self, hidden_states: torch.Tensor) -> bool:
        """The CPU fused forward takes biases and the gated activations with a `kernel_spec` (SwiGLU, GPT-OSS's)."""
        from . import native

        return (
            hidden_states.device.type == "cpu"
            and hidden_states.shape[0] <= native.MAX_TOKENS
            and self._kernels_apply(hidden_states)
            and native.activation_spec(self.activation) is not None
            and native.library() is not None
        )

    def native_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The native fused kernel, unchecked (`native_usable` said yes)."""
        from .native import table_for

        return table_for(self, _pack_epoch).forward(hidden, top_k_index, top_k_weights)

    def gpu_usable(self, hidden_states: torch.Tensor) -> bool:
        """The CUDA and Triton paths take bias-free SwiGLU experts."""
        from . import cuda_kernels

        return (
            hidden_states.device.type == "cuda"
            and self._kernels_apply(hidden_states)
            and isinstance(self.activation, GatedActivation)
            and self.activation.is_swiglu
            and not self.has_bias
            and (cuda_kernels.triton_available() or cuda_kernels.library() is not None)
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one custom op in the graph (runtime/decode.py), the native kernel inside
            from .decode import experts_op

            return experts_op(self, hidden_states, top_k_index, top_k_weights)
        if self.native_usable(hidden_states):
            return self.native_forward(hidden_states, top_k_index, top_k_weights)
        if self.gpu_usable(hidden_states):
            from .cuda_kernels import table_for

            return table_for(self, _pack_epoch).forward(hidden_states, top_k_index, top_k_weights)
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def _apply(self, fn, recurse=True):
        from . import cuda_kernels, native

        native.drop_table(self)  # buffers may move or change dtype: the kernel tables point into them
        cuda_kernels.drop_table(self)
        return super()._apply(fn, recurse)


class MappedExperts(nn.Module):
    """A reduced experts module addressed through the original router slots: slot s -> expert slot_map[s]."""

    def __init__(self, experts: nn.Module, slot_map: torch.Tensor):
        super().__init__()
        self.experts = experts
        self.register_buffer("slot_map", slot_map.to(torch.long), persistent=False)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # index E (one past the slots) means "no expert" (a skipped pair); it maps to the inner "no expert"
        table = torch.cat([self.slot_map, self.slot_map.new_tensor([self.experts.num_experts])])
        return self.experts(hidden_states, table.to(top_k_index.device)[top_k_index], top_k_weights)


def _is_gated(activation: nn.Module) -> bool:
    """A two-argument activation(gate, up) rather than an activation function of one tensor."""
    return isinstance(activation, GatedActivation) or getattr(activation, "gated", False)


def set_dequant_cache(model: nn.Module, enabled: bool) -> None:
    """Keep dequantized expert weights between forwards (faster CPU evaluation, full-precision memory)."""
    for module in model.modules():
        if isinstance(module, ExpertList):
            module.set_cache_dequantized(enabled)


def install_packed_experts(
    view: MoEBlockView,
    packed: list[dict[str, PackedTensor]] | None,
    methods: list[str],
    formats: list[dict[str, QuantFormat]] | None = None,
) -> PackedExperts:
    """Replace the block's fused experts module with a `PackedExperts` holding `packed` (and the experts' biases,
    where the architecture has them), each expert's projections marked with the method that rounded them; with
    `packed` None, an empty one of `formats` on the meta device (a streamed layer whose tensors are already on
    disk)."""
    first = view.expert_weights(view.held.start)
    hidden, intermediate = first.down_proj.shape
    bias = first.gate_bias is not None
    formats = formats or [{p: t.fmt for p, t in e.items()} for e in packed]
    with torch.device("meta") if packed is None else contextlib.nullcontext():
        module = PackedExperts(hidden, intermediate, formats, view.activation, bias)
    for e, (expert, method) in enumerate(zip(module, methods)):
        weights = view.expert_weights(e) if bias and packed is not None else None
        for proj in PROJECTIONS:
            linear = getattr(expert, proj)
            if packed is not None:
                linear.load_packed(packed[e][proj])
                if weights is not None:
                    linear.bias.copy_(weights.bias(proj))
            linear.method = method
    view.experts = module
    return module


def packed_state(view: MoEBlockView, packed: list[dict[str, PackedTensor]], first: int) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of routed experts `first`, `first + 1`, ... (`packed`: a chunk of a streamed layer, no
    biases), named as the block's `PackedExperts` names them once installed (`12.gate_proj.weight_packed`)."""
    hidden, intermediate = packed[0]["down_proj"].shape
    module = PackedExperts(hidden, intermediate, [{p: t.fmt for p, t in e.items()} for e in packed], view.activation)
    for expert, tensors in zip(module, packed):
        for proj in PROJECTIONS:
            getattr(expert, proj).load_packed(tensors[proj])
    state = persistent_state(module)
    return {f"{first + int(k.split('.', 1)[0])}.{k.split('.', 1)[1]}": v for k, v in state.items()}


def persistent_state(
    model: nn.Module, dtype: torch.dtype | None = None, leave_out: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates, on the CPU; unquantized float tensors cast to `dtype` if given; the
    tensors named in `leave_out` (stored already: a chunked layer's experts) not included."""
    seen: set[tuple[int, tuple]] = set()
    state = {}
    packed_names = {
        f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, PackedLinear) for b, _ in m.named_buffers()
    }
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen or name in leave_out:
            continue
        seen.add(key)
        if (
            dtype is not None
            and tensor.is_floating_point()
            and name not in packed_names
            and ".skip_predictor." not in name
        ):
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().cpu().contiguous()
    return state
