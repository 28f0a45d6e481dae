"""MoTE upcycling: a dense Qwen2 model becomes a Qwen2-MoE whose shared expert is the dense FFN (kept in
full precision) and whose routed experts are copies of it, to be ternarized and trained.

The upcycled model computes exactly the dense function at the start:
  (1 - routed_share) * FFN(x)  [shared expert; its sigmoid gate starts at 0.5, compensated in down_proj]
+ routed_share * sum_k g_k FFN_k(x)  [top-k weights renormalised to sum to 1; FFN_k = FFN + noise]
so ternarizing the routed experts perturbs only the `routed_share` part, which recovery training repairs
(distilling from the dense model: recipe key recovery.teacher).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import get_adapter
from ..models.base import ExpertWeights

UPCYCLE_SOURCES = ("qwen2",)


@torch.no_grad()
def upcycle_dense_to_mote(
    dense: nn.Module, num_experts: int = 8, top_k: int = 2, routed_share: float = 0.5, noise: float = 0.0, seed: int = 0
) -> nn.Module:
    """A `Qwen2MoeForCausalLM` built from the dense `Qwen2ForCausalLM` `dense`."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = dense.config
    if config.model_type not in UPCYCLE_SOURCES:
        raise UnsupportedModelError(
            f"upcycling starts from a dense model of type {list(UPCYCLE_SOURCES)}, not '{config.model_type}'."
        )
    if not 0 < routed_share <= 1 or not 1 <= top_k <= num_experts:
        raise ValueError("use 0 < routed_share <= 1 and 1 <= top_k <= num_experts")
    fields = {
        k: v for k, v in config.to_dict().items() if k not in ("architectures", "model_type", "transformers_version")
    }
    moe_config = Qwen2MoeConfig(
        **fields,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        qkv_bias=True,
        moe_intermediate_size=config.intermediate_size,
        shared_expert_intermediate_size=config.intermediate_size,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    moe = Qwen2MoeForCausalLM(moe_config).to(next(dense.parameters()).dtype).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = moe.load_state_dict(state, strict=False)
    views = get_adapter("qwen2_moe").moe_blocks(moe)
    for view, dense_layer in zip(views, dense.model.layers):
        ffn, block = dense_layer.mlp, view.block
        for name in ("gate_proj", "up_proj"):
            getattr(block.shared_expert, name).weight.copy_(getattr(ffn, name).weight)
        block.shared_expert.down_proj.weight.copy_(ffn.down_proj.weight * 2 * (1 - routed_share))
        block.shared_expert_gate.weight.zero_()
        gate_up = torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight], dim=0)
        for e in range(num_experts):
            jitter = noise * gate_up.std() * torch.randn(gate_up.shape, generator=generator).to(gate_up)
            gate, up = (gate_up + jitter).chunk(2, dim=0)
            view.set_expert_weights(e, ExpertWeights(gate, up, ffn.down_proj.weight * routed_share))
        block.gate.weight.normal_(0, 0.02, generator=generator)
    unset = [k for k in missing if ".mlp." not in k and "rotary" not in k]
    if unset:
        raise UnsupportedModelError(
            f"upcycling left parameters unset: {unset[:5]}; the dense model's layout is not Qwen2's."
        )
    return moe
