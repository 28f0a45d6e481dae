"""Uniform view of the MoE blocks of a transformers v5 model.

An adapter knows where an architecture keeps its decoder layers, routers, fused experts and
shared experts, how its router scores tokens, and which tokens are image tokens. Everything
downstream (calibration, quantization, export) talks to `MoEBlockView`, never to model classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

MODALITIES = ("text", "image", "audio")  # statistics count tokens per modality; ids 0, 1, 2
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
BIASES = ("gate_bias", "up_bias", "down_bias")


def modality_weights_problem(weights: dict[str, float], where: str) -> str | None:
    """Why a recipe section's `modality_weights` cannot be used (unknown modality, a weight below 0, all 0), or None."""
    if set(weights) - set(MODALITIES) or any(w < 0 for w in weights.values()) or not any(weights.values()):
        return f"{where}.modality_weights {weights}: give weights >= 0, not all 0, to modalities of {list(MODALITIES)}"
    return None


@dataclass
class ExpertWeights:
    """One routed expert as plain matrices: gate/up [I, H], down [H, I], and their biases where the
    architecture has them (GPT-OSS): gate/up [I], down [H]."""

    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def bias(self, projection: str) -> torch.Tensor | None:
        return getattr(self, projection.replace("_proj", "_bias"))

    def replace(self, **matrices: torch.Tensor) -> ExpertWeights:
        return ExpertWeights(
            **{p: matrices.get(p, getattr(self, p)) for p in PROJECTIONS},
            **{b: matrices.get(b, getattr(self, b)) for b in BIASES},
        )


class GatedActivation(nn.Module):
    """The expert's hidden activation from its gate and up projections: act(gate) * up (SwiGLU with SiLU)."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up

    @property
    def is_swiglu(self) -> bool:
        """SiLU(gate) * up: what every kernel computes."""
        return type(self.act).__name__ in ("SiLU", "SiLUActivation")

    def kernel_spec(self) -> tuple[int, float, float] | None:
        """(kind, alpha, limit) for the CPU fused forward: 0 for SiLU(gate) * up; None for other activations."""
        return (0, 0.0, 0.0) if self.is_swiglu else None


class ExpertsGate(nn.Module):
    """An experts class's own `_apply_gate(gate_up)` (clamped SwiGLUs and the like) as `activation(gate, up)`: it runs
    on a copy of the experts' plain attributes (limits, alphas) and their `act_fn`, joined as the class stores them."""

    gated = True  # activation(gate, up), not an activation of one tensor

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.gate_fn = type(experts)._apply_gate
        self.concatenated = bool(getattr(experts, "is_concatenated", True))
        plain = {k: v for k, v in vars(experts).items() if isinstance(v, (int, float, bool, str)) and k[0] != "_"}
        self.act_fn = getattr(experts, "act_fn", None)
        self.state = SimpleNamespace(**plain, act_fn=self.act_fn)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.gate_fn(self.state, _join(gate, up, self.concatenated, dim=-1))


def _split(fused: torch.Tensor, concatenated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) along the first dimension of a fused gate_up matrix [2I, H] or bias [2I]: halves, or interleaved."""
    return tuple(fused.chunk(2, dim=0)) if concatenated else (fused[0::2], fused[1::2])


def _join(gate: torch.Tensor, up: torch.Tensor, concatenated: bool, dim: int = 0) -> torch.Tensor:
    """`_split`'s inverse along `dim`."""
    if concatenated:
        return torch.cat([gate, up], dim=dim)
    dim %= gate.dim()
    return torch.stack([gate, up], dim=dim + 1).flatten(dim, dim + 1)


@dataclass
class MoEBlockView:
    """One sparse MoE block. `experts` stores fused `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
    (or is a `PackedExperts` after quantization). Where a decoder layer has one block per modality (ERNIE-4.5-VL's
    text and vision experts), each is a view with its `group`: the modality of every token it sees."""

    layer_index: int
    name: str
    block: nn.Module
    adapter: ModelAdapter
    group: str | None = None

    @property
    def key(self) -> int | str:
        """How plans, statistics and reports name the block: its layer index, with its group where it has one."""
        return self.layer_index if self.group is None else f"{self.layer_index}.{self.group}"

    @property
    def router(self) -> nn.Module:
        return self.adapter.router_module(self.block)

    @property
    def experts(self) -> nn.Module:
        return getattr(self.block, self.adapter.experts_name)

    @experts.setter
    def experts(self, module: nn.Module) -> None:
        setattr(self.block, self.adapter.experts_name, module)

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's [E, H] matrix, wherever the adapter says the router keeps it."""
        return self.adapter.router_linear(self.router).weight

    def router_rows(self) -> torch.Tensor:
        """The router's [E, H] matrix, with one more column per per-expert vector of the router (its bias, as
        GPT-OSS's; ERNIE's selection bias): rows that pruning selects and merging averages."""
        weight = self.adapter.router_linear(self.router).weight.data
        vectors = [
            getattr(m, n).data.reshape(-1, weight.shape[0]).T for m, n in self.adapter.router_vectors(self.block)
        ]
        return torch.cat([weight, *(v.to(weight.dtype) for v in vectors)], dim=1)

    def set_router_rows(self, rows: torch.Tensor) -> None:
        """Another set of router rows (as `router_rows` gives them): after experts were merged or pruned."""
        vectors = self.adapter.router_vectors(self.block)  # before the matrix changes: the default reads its bias
        linear = self.adapter.router_linear(self.router)
        hidden = linear.weight.shape[1]
        linear.weight = nn.Parameter(rows[:, :hidden].contiguous(), requires_grad=False)
        for column, (module, name) in enumerate(vectors, start=hidden):
            old = getattr(module, name)
            new = rows[:, column].to(old.dtype).reshape(*old.shape[:-1], -1).contiguous()
            setattr(module, name, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)

    @property
    def num_experts(self) -> int:
        """The block's routed experts, all of them also while a streamed layer's module holds a chunk."""
        return getattr(self.experts, "total_experts", None) or self.adapter.experts_shape(self)[0]

    @property
    def held(self) -> range:
        """The routed experts the experts module holds: all, or the chunk a streamed layer read (`chunk`)."""
        chunk = getattr(self.experts, "chunk", None)
        return chunk if chunk is not None else range(self.num_experts)

    @property
    def expert_params(self) -> int:
        """Weights of the routed experts (as float matrices, however they are stored)."""
        return self.num_experts * sum(self.expert_weights(self.held.start)[p].numel() for p in PROJECTIONS)

    @property
    def intermediate_size(self) -> int:
        return int(self.expert_weights(self.held.start).down_proj.shape[1])

    @property
    def activation(self) -> nn.Module:
        """The experts' gated activation, `activation(gate, up)` (a `GatedActivation` unless the architecture
        has its own, as GPT-OSS)."""
        experts = self.experts
        return experts.activation if hasattr(experts, "activation") else self.adapter.expert_activation(experts)

    @property
    def hidden_size(self) -> int:
        return self.adapter.experts_shape(self)[1]

    @property
    def device(self) -> torch.device:
        """Where the block computes (its experts' device)."""
        return next(chain(self.experts.parameters(), self.experts.buffers())).device

    @property
    def top_k(self) -> int:
        return int(self.adapter.top_k(self.block))

    @property
    def norm_topk_prob(self) -> bool:
        return self.adapter.norm_topk_prob(self.router)

    @property
    def shared_experts(self) -> nn.Module | None:
        return self.adapter.shared_experts(self.block)

    def route(self, hidden: torch.Tensor, excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing weights and expert indices for tokens `hidden` [T, H], with the experts whose
        entry in the bool mask `excluded` [E] is set made unreachable (as if their router rows were removed)."""
        return self.adapter.route_block(self.block, hidden, excluded)

    def expert_inputs(self, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the expert computes on, the weight its output is summed with) for tokens x [T, H] routed to it with
        `weights` [T]: (x, weights), or (weights x, 1) where the router scales the experts' inputs (Llama 4)."""
        if self.adapter.scales_expert_inputs:
            return x * weights[:, None].to(x.dtype), torch.ones_like(weights)
        return x, weights

    def routed_forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' summed output for tokens x [T, H] and their top-k `indices` and `weights`."""
        if self.adapter.scales_expert_inputs:
            return input_scaled_experts(self.experts, x, indices, weights)
        return self.experts(x, indices, weights)

    def expert_weights(self, expert: int) -> ExpertWeights:
        experts = self.experts
        if hasattr(experts, "expert_weights"):
            return experts.expert_weights(expert)
        return self.adapter.expert_weights(experts, expert - self.held.start)

    def set_expert_weights(self, expert: int, weights: ExpertWeights) -> None:
        with torch.no_grad():
            self.adapter.set_expert_weights(self.experts, expert - self.held.start, weights)

    def replace_experts(self, weights: list[ExpertWeights]) -> None:
        """New fused expert tensors from `weights` (another count or width; the architecture's layout)."""
        with torch.no_grad():
            self.adapter.replace_experts(self.experts, weights)

    def expert_forward(
        self, expert: int, x: torch.Tensor, weights: ExpertWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(intermediate activations fed to down_proj, expert output) for tokens x [T, H], with the
        expert's own weights or the replacement `weights`."""
        w = weights if weights is not None else self.expert_weights(expert)
        hidden = self.activation(_linear(x, w.gate_proj, w.gate_bias), _linear(x, w.up_proj, w.up_bias))
        return hidden, _linear(hidden, w.down_proj, w.down_bias)


def input_scaled_experts(
    experts: nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_k E_k(w_k x) with a common experts module `experts(hidden, top_k_index, top_k_weights)`: each
    (token, slot) pair becomes one row, scaled by its weight, routed to its expert with weight 1."""
    tokens, k = indices.shape
    scaled = (x[:, None, :] * weights[..., None].to(x.dtype)).reshape(tokens * k, -1)
    ones = torch.ones(tokens * k, 1, dtype=weights.dtype, device=weights.device)
    return experts(scaled, indices.reshape(-1, 1), ones).view(tokens, k, -1).sum(1)


_SWAPPED: dict[type, type] = {}


def swap_forward(module: nn.Module, forward) -> None:
    """Give `module` a subclass of its class (`Routed<name>`) whose forward is `forward`, once; the parameters and
    state-dict names stay."""
    cls = type(module)
    if cls in _SWAPPED.values():
        return
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"Routed{cls.__name__}", (cls,), {"forward": forward})
    module.__class__ = _SWAPPED[cls]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class ModelAdapter:
    """Defaults fit the Qwen-style layout `model.model.layers[i].mlp.{gate,experts}` with softmax routing."""

    model_types: tuple[str, ...] = ()
    is_multimodal = False
    block_name = "mlp"  # the decoder layer's attribute holding the sparse MoE block
    router_name = "gate"  # the block's attribute holding the router
    experts_name = "experts"  # the block's attribute holding the fused experts
    scales_expert_inputs = False  # routing weights scale the experts' outputs (True: their inputs, as Llama 4)
    observes_routing = False  # calibration recomputes routing with `route` (True: reads it at the experts' inputs)

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.text_model(model).layers

    def moe_blocks(self, model: nn.Module) -> list[MoEBlockView]:
        prefix = self.layers_prefix(model)
        views = []
        for i, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            if block is not None:
                views.append(MoEBlockView(i, f"{prefix}.{i}.{self.block_name}", block, self))
        return views

    def moe_blocks_by_layer(self, model: nn.Module) -> dict[int, list[MoEBlockView]]:
        """`moe_blocks` by decoder layer index: each layer's one block, or one per modality group."""
        by_layer: dict[int, list[MoEBlockView]] = {}
        for view in self.moe_blocks(model):
            by_layer.setdefault(view.layer_index, []).append(view)
        return by_layer

    def layers_prefix(self, model: nn.Module) -> str:
        layers = self.decoder_layers(model)
        return next(name for name, module in model.named_modules() if module is layers)

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        mlp = getattr(layer, self.block_name, None)
        if mlp is not None and hasattr(mlp, self.experts_name) and hasattr(mlp, self.router_name):
            return mlp
        return None

    def router_module(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_name)

    def experts_shape(self, view: MoEBlockView) -> tuple[int, int]:
        """(routed experts, hidden size) of a block: the shape of its router's matrix."""
        rows, columns = view.router_weight.shape
        return int(rows), int(columns)

    def top_k(self, block: nn.Module) -> int:
        return int(self.router_module(block).top_k)

    def norm_topk_prob(self, router: nn.Module) -> bool:
        return bool(getattr(router, "norm_topk_prob", False))

    def router_vectors(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        """The router's per-expert vectors besides its matrix, as (module, attribute) of tensors [..., E]: pruned
        and merged with its rows. Default: the router linear's bias, where it has one."""
        linear = self.router_linear(self.router_module(block))
        return [(linear, "bias")] if getattr(linear, "bias", None) is not None else []

    def router_linear(self, router: nn.Module) -> nn.Module:
        """The module holding the router's [E, H] `weight` and optional `bias` (the router itself unless it
        wraps a linear)."""
        return router

    # The fused experts module's layout, as transformers' `use_experts_implementation` flags describe it on the module:
    # `gate_up_proj [E, 2I, H]` (gate rows then up rows, or interleaved where not `is_concatenated`) and
    # `down_proj [E, H, I]`, or both transposed (`is_transposed`: [E, H, 2I], [E, I, H]); `gate_up_proj_bias [E, 2I]`
    # and `down_proj_bias [E, H]` where `has_bias`. A module without the flags takes the adapter's `transposed`.
    transposed = False

    def layout(self, experts: nn.Module) -> tuple[bool, bool, bool]:
        """(transposed, gate and up concatenated, biases) of a fused experts module."""
        flags = ("is_transposed", "is_concatenated", "has_bias")
        return tuple(bool(getattr(experts, f, d)) for f, d in zip(flags, (self.transposed, True, False)))

    def expert_weights(self, experts: nn.Module, e: int) -> ExpertWeights:
        transposed, concatenated, bias = self.layout(experts)
        gate_up, down = experts.gate_up_proj[e], experts.down_proj[e]
        gate, up = _split(gate_up.t() if transposed else gate_up, concatenated)
        biases = (*_split(experts.gate_up_proj_bias[e], concatenated), experts.down_proj_bias[e]) if bias else ()
        return ExpertWeights(gate, up, down.t() if transposed else down, *biases)

    def set_expert_weights(self, experts: nn.Module, e: int, w: ExpertWeights) -> None:
        transposed, concatenated, bias = self.layout(experts)
        gate_up = _join(w.gate_proj, w.up_proj, concatenated)
        experts.gate_up_proj[e].copy_(gate_up.t() if transposed else gate_up)
        experts.down_proj[e].copy_(w.down_proj.t() if transposed else w.down_proj)
        if bias and w.gate_bias is not None:
            experts.gate_up_proj_bias[e].copy_(_join(w.gate_bias, w.up_bias, concatenated))
            experts.down_proj_bias[e].copy_(w.down_bias)

    def replace_experts(self, experts: nn.Module, weights: list[ExpertWeights]) -> None:
        """New fused tensors from `weights` (another count or width), in the module's layout."""
        transposed, concatenated, bias = self.layout(experts)
        dtype, grad = experts.down_proj.dtype, experts.down_proj.requires_grad
        gate_up = [_join(w.gate_proj, w.up_proj, concatenated) for w in weights]
        tensors = {
            "gate_up_proj": torch.stack([g.t() if transposed else g for g in gate_up]),
            "down_proj": torch.stack([w.down_proj.t() if transposed else w.down_proj for w in weights]),
        }
        if bias:
            tensors["gate_up_proj_bias"] = torch.stack([_join(w.gate_bias, w.up_bias, concatenated) for w in weights])
            tensors["down_proj_bias"] = torch.stack([w.down_bias for w in weights])
        for name, tensor in tensors.items():
            setattr(experts, name, nn.Parameter(tensor.to(dtype).contiguous(), requires_grad=grad))
        experts.num_experts = len(weights)
        for name in ("intermediate_dim", "intermediate_size", "expert_dim"):  # whichever the class keeps
            if hasattr(experts, name):
                setattr(experts, name, int(weights[0].down_proj.shape[1]))

    def expert_parameters(self, experts: nn.Module) -> list[nn.Parameter]:
        """The fused experts' trainable tensors."""
        biases = ["gate_up_proj_bias", "down_proj_bias"] if self.layout(experts)[2] else []
        return [getattr(experts, n) for n in ("gate_up_proj", "down_proj", *biases)]

    def down_projections(self, experts: nn.Module) -> tuple[nn.Parameter, bool]:
        """The fused down projections, and whether they are stored transposed ([E, I, H] instead of [E, H, I])."""
        return experts.down_proj, self.layout(experts)[0]

    def expert_activation(self, experts: nn.Module) -> nn.Module:
        """act(gate) * up with the experts' `act_fn`, or the class's own `_apply_gate` where it has one."""
        from transformers.integrations.moe import _default_apply_gate

        if getattr(type(experts), "_apply_gate", _default_apply_gate) is _default_apply_gate:
            return GatedActivation(experts.act_fn)
        return ExpertsGate(experts)

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return None

    def route(
        self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        linear = self.router_linear(router)
        weight, bias = linear.weight, getattr(linear, "bias", None)
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)).float()
        if excluded is not None:
            logits = logits.masked_fill(excluded.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_k = min(router.top_k, weight.shape[0] - (0 if excluded is None else int(excluded.sum())))
        weights, indices = torch.topk(probs, top_k, dim=-1)
        if self.norm_topk_prob(router):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(hidden.dtype), indices

    def route_block(
        self, block: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`route` with the block's router; an adapter whose routing reads state kept on the block overrides this."""
        return self.route(self.router_module(block), hidden, excluded)

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of image tokens in `input_ids`; text-only models have none."""
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def audio_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of audio tokens in `input_ids` (Qwen3-Omni); models without an audio tower have none."""
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def after_layer(self, layer_index: int, hidden: torch.Tensor, extras: dict) -> torch.Tensor:
        """Hook for what the text model adds between decoder layers (e.g. DeepStack visual features)."""
        return hidden

    def capture_extras(self, text_model_kwargs: dict) -> dict:
        """Per-sample tensors, taken from the text model's call, that `after_layer` needs."""
        return {}

    num_experts_key = "num_experts"
    expert_intermediate_key = "moe_intermediate_size"

    def set_num_experts(self, model: nn.Module, num_experts: int) -> None:
        """Record a new routed-expert count (after pruning/merging) where the config keeps it."""
        config = getattr(model.config, "text_config", model.config)
        setattr(config, self.num_experts_key, num_experts)

    def set_expert_intermediate_size(self, model: nn.Module, size: int) -> None:
        """Record a new routed-expert width (after neuron slimming) where the config keeps it."""
        config = getattr(model.config, "text_config", model.config)
        setattr(config, self.expert_intermediate_key, size)

    def auto_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


class VisionLanguageAdapter(ModelAdapter):
    """Base of the adapters whose MoE text decoder (`model.model.language_model`) sits behind a vision tower and
    whose image positions hold `config.image_token_id`; list it first: `class A(VisionLanguageAdapter, TextAdapter)`."""

    is_multimodal = True

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == model.config.image_token_id

    def auto_model_class(self):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
