import torch
import torch.nn.functional as F
from torch import nn

from .base import ModelAdapter, VisionLanguageAdapter, input_scaled_experts, swap_forward
from .registry import register_adapter


def _router_forward(self, hidden: torch.Tensor):
    """Llama 4's router in the common (logits, top-k weights, indices) form: sigmoid of the top-k logits."""
    logits = F.linear(hidden, self.weight, self.bias)
    values, indices = torch.topk(logits, self.top_k, dim=1)
    return logits, torch.sigmoid(values.float()).to(logits.dtype), indices


def _block_forward(self, hidden_states: torch.Tensor):
    """Llama4TextMoe's forward with the experts called as every other architecture's are (only the routed
    tokens, each on its input scaled by its routing weight) instead of on a dense [E x T, H] input."""
    hidden = hidden_states.reshape(-1, self.hidden_dim)
    logits, weights, indices = self.router(hidden)
    out = self.shared_expert(hidden)
    return out + input_scaled_experts(self.experts, hidden, indices, weights).to(out.dtype), logits


def _experts_forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """The dense experts as a v5 fused experts module: `forward(hidden, top_k_index, top_k_weights)`."""
    out = torch.zeros_like(hidden)
    for e in top_k_index.unique().tolist():
        if not 0 <= e < self.gate_up_proj.shape[0]:  # index E: a skipped slot
            continue
        tok, slot = torch.where(top_k_index == e)
        gate, up = (hidden[tok] @ self.gate_up_proj[e]).chunk(2, dim=-1)
        y = (up * self.act_fn(gate)) @ self.down_proj[e]
        out.index_add_(0, tok, y * top_k_weights[tok, slot, None])
    return out


@register_adapter
class Llama4TextAdapter(ModelAdapter):
    """Llama 4: sigmoid of the top-k router logits, unnormalised, scales each routed expert's *input*
    (`E(s x)`, not `s E(x)`); a shared expert; experts stored transposed (`transposed`: `gate_up_proj [E, H, 2I]`,
    gate columns then up columns, `down_proj [E, I, H]`); dense and MoE layers interleave. The first time a block is
    viewed, its router, experts and forward take the common (hidden, top-k index, top-k weights) form, so packed,
    mapped and skipped experts drop in (same outputs, same state dict). Merging and pruning compare experts on
    unscaled tokens."""

    model_types = ("llama4_text",)
    block_name = "feed_forward"
    router_name = "router"
    num_experts_key = "num_local_experts"
    expert_intermediate_key = "intermediate_size"
    scales_expert_inputs = True
    transposed = True  # its experts class has no layout flags

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.model

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        block = super().moe_block(layer)
        if block is not None:
            swap_forward(block, _block_forward)
            swap_forward(block.router, _router_forward)
            if hasattr(block.experts, "gate_up_proj"):
                swap_forward(block.experts, _experts_forward)
        return block

    def route(self, router: nn.Module, hidden: torch.Tensor, excluded: torch.Tensor | None):
        logits = F.linear(hidden, router.weight.to(hidden.dtype)).float()
        if excluded is not None:
            logits = logits.masked_fill(excluded.to(logits.device), float("-inf"))
        top_k = min(router.top_k, logits.shape[1] - (0 if excluded is None else int(excluded.sum())))
        values, indices = torch.topk(logits, top_k, dim=-1)
        return torch.sigmoid(values).to(hidden.dtype), indices

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        return block.shared_expert


@register_adapter
class Llama4Adapter(VisionLanguageAdapter, Llama4TextAdapter):
    """Llama 4 with its vision tower: the text decoder is `model.language_model.model`."""

    model_types = ("llama4",)

    def text_model(self, model: nn.Module) -> nn.Module:
        return model.language_model.model
