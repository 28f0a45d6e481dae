"""Routed experts stored factored (D²-MoE): a shared packed base expert and, per expert and projection, a packed
delta: low-rank, W_e = W_0 + lora_B_e @ lora_A_e (PEFT's naming: lora_A [r, in] is applied first), or dense,
W_e = W_0 + D_e. An expert at rank 0 is the base alone. Without a base (W_0 = 0) the deltas are the experts.

Module layout (state-dict keys): `experts.base.{gate_proj,up_proj,down_proj}.weight_packed|scale|zero_point` and
`experts.{e}.{projection}.lora_A|lora_B|weight.weight_packed|...`.

The forward computes the base once per token, not once per routed expert: the gate and up base projections are
shared by a token's top-k experts, and the down base is linear, so sum_k w_k W0_down h_k = W0_down (sum_k w_k h_k).
Only the small deltas run per expert."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantFormat
from ..models.base import PROJECTIONS, ExpertWeights
from .packed_experts import ExpertList, PackedExpert, PackedLinear

DENSE = -1  # the rank that stands for a dense delta


class ExpertDelta(nn.Module):
    """One expert projection's delta to the base: nothing (rank 0), lora_B @ lora_A (rank r, two packed matrices) or
    one dense packed matrix `weight` (rank `DENSE`)."""

    def __init__(self, out_features: int, in_features: int, rank: int, formats: tuple[QuantFormat | None, ...]):
        super().__init__()
        self.out_features, self.in_features, self.rank = out_features, in_features, rank
        if rank == DENSE:
            self.weight = PackedLinear(out_features, in_features, formats[0])
        elif rank:
            self.lora_A = PackedLinear(rank, in_features, formats[0])
            self.lora_B = PackedLinear(out_features, rank, formats[1])

    def matrices(self) -> list[PackedLinear]:
        """The packed matrices in the order they apply to an input."""
        return [] if not self.rank else [self.weight] if self.rank == DENSE else [self.lora_A, self.lora_B]

    def load(self, packed: tuple | None) -> None:
        for linear, tensor in zip(self.matrices(), packed or ()):
            linear.load_packed(tensor)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if not self.rank:
            return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.device)
        if self.rank == DENSE:
            return self.weight.dequantize(dtype)
        return self.lora_B.dequantize(dtype) @ self.lora_A.dequantize(dtype)

    @property
    def device(self) -> torch.device:
        buffers = [m.weight_packed for m in self.matrices()]
        return buffers[0].device if buffers else torch.device("cpu")

    def spec(self) -> tuple[int, QuantFormat | None, QuantFormat | None]:
        """(rank, the first matrix's format, the second's)."""
        fmts = [m.fmt for m in self.matrices()] + [None, None]
        return (self.rank, fmts[0], fmts[1])


class FactoredExpert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, deltas: dict[str, tuple[int, QuantFormat, QuantFormat]]):
        super().__init__()
        shapes = {
            "gate_proj": (intermediate, hidden),
            "up_proj": (intermediate, hidden),
            "down_proj": (hidden, intermediate),
        }
        for p in PROJECTIONS:
            rank, fmt_a, fmt_b = deltas[p]
            setattr(self, p, ExpertDelta(*shapes[p], rank, (fmt_a, fmt_b)))


class FactoredExperts(ExpertList):
    """A drop-in fused-experts module (`forward(hidden, top_k_index, top_k_weights)`) holding a packed base expert
    (or none) and each expert's packed deltas (`deltas[e][projection]` = (rank, lora_A format, lora_B format), or
    (`DENSE`, format, None)).
    On CPU its packed matrices run through the native GEMV, elsewhere through the torch reference path."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        base_formats: dict[str, QuantFormat] | None,
        deltas: list[dict[str, tuple[int, QuantFormat | None, QuantFormat | None]]],
        activation: nn.Module,
    ):
        experts = [FactoredExpert(hidden_size, intermediate_size, d) for d in deltas]
        super().__init__(experts, hidden_size, intermediate_size, activation)
        self.base = PackedExpert(hidden_size, intermediate_size, base_formats) if base_formats else None

    def __getitem__(self, expert: int) -> FactoredExpert:
        return self._modules[str(expert)]

    def deltas(self) -> list[dict[str, tuple[int, QuantFormat | None, QuantFormat | None]]]:
        return [{p: getattr(expert, p).spec() for p in PROJECTIONS} for expert in self]

    def base_formats(self) -> dict[str, QuantFormat] | None:
        return {p: getattr(self.base, p).fmt for p in PROJECTIONS} if self.base is not None else None

    def expert_weights(self, expert: int, dtype: torch.dtype = torch.float32) -> ExpertWeights:
        e = self[expert]
        if self.base is None:
            return ExpertWeights(*(getattr(e, p).dense(dtype) for p in PROJECTIONS))
        return ExpertWeights(
            *(getattr(self.base, p).dequantize(dtype) + getattr(e, p).dense(dtype) for p in PROJECTIONS)
        )

    def _native(self, x: torch.Tensor) -> bool:
        """On CPU every packed matrix runs through the native GEMV (`runtime/native.py`), unless dequantized copies
        are cached (evaluation) or gradients are needed."""
        from . import native

        grad = torch.is_grad_enabled() and x.requires_grad
        return x.device.type == "cpu" and not self.cache_dequantized and not grad and native.library() is not None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self._native(hidden_states):
            from . import packed_experts
            from .native import INT8_TOKENS, linear_table_for

            x = hidden_states.to(torch.float32)
            int8 = x.shape[0] <= INT8_TOKENS
            table = linear_table_for(self, packed_experts._pack_epoch)
            out = self._forward(x, top_k_index, top_k_weights, lambda m, v: table.linear(m, v, int8))
            return out.to(hidden_states.dtype)
        return self._forward(hidden_states, top_k_index, top_k_weights, lambda m, v: m(v))

    def _apply(self, fn, recurse=True):
        from . import native

        native.drop_linear_table(self)  # buffers may move or change dtype: the descriptors point into them
        return super()._apply(fn, recurse)

    def _forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, linear) -> torch.Tensor:
        """`linear(packed_linear_module, x)` computes each packed matrix's product."""

        def apply(module: ExpertDelta, v: torch.Tensor) -> torch.Tensor:
            for matrix in module.matrices():
                v = linear(matrix, v)
            return v

        shape = (x.shape[0], self.intermediate_size)
        base = self.base
        gate0 = linear(base.gate_proj, x) if base is not None else x.new_zeros(shape)
        up0 = linear(base.up_proj, x) if base is not None else x.new_zeros(shape)
        mixed = torch.zeros_like(gate0)  # sum_k w_k h_k per token, for the base down projection
        out = torch.zeros_like(x)
        for e in top_k_index.unique().tolist():
            if not 0 <= e < self.num_experts:
                continue
            tok, slot = torch.where(top_k_index == e)
            expert, xe, w = self[e], x[tok], top_k_weights[tok, slot, None].to(x.dtype)
            gate, up = gate0[tok], up0[tok]
            if expert.gate_proj.rank:
                gate = gate + apply(expert.gate_proj, xe)
            if expert.up_proj.rank:
                up = up + apply(expert.up_proj, xe)
            h = self.activation(gate, up)
            mixed.index_add_(0, tok, h * w)
            if expert.down_proj.rank:
                out.index_add_(0, tok, apply(expert.down_proj, h) * w)
        return out + linear(base.down_proj, mixed) if base is not None else out
