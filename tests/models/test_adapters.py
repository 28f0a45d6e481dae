import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from moecompress.errors import UnsupportedModelError
from moecompress.models import get_adapter, supported_model_types
from moecompress.models.loading import require_moe

from .tiny_models import CONFIGS, tiny_model


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_adapter_routing_reproduces_the_model_router(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model_type)
    views = adapter.moe_blocks(model)
    assert views and all(v.num_experts == 8 and v.top_k == 2 for v in views)
    x = torch.randn(50, 64)
    for view in views:
        _, ref_weights, ref_indices = view.router(x)
        weights, indices = view.route(x)
        order_ref, order = ref_indices.sort(dim=1), indices.sort(dim=1)
        assert torch.equal(order_ref.values, order.values)
        torch.testing.assert_close(ref_weights.gather(1, order_ref.indices), weights.gather(1, order.indices).to(ref_weights.dtype))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_per_expert_view_reproduces_the_fused_experts_output(model_type):
    model = tiny_model(model_type)
    view = get_adapter(model_type).moe_blocks(model)[0]
    x = torch.randn(40, 64)
    weights, indices = view.route(x)
    manual = torch.zeros_like(x)
    for e in range(view.num_experts):
        tok, slot = torch.where(indices == e)
        manual.index_add_(0, tok, weights[tok, slot, None] * view.expert_forward(e, x[tok])[1])
    torch.testing.assert_close(view.experts(x, indices, weights), manual, rtol=1e-5, atol=1e-5)


def test_excluded_expert_is_never_selected():
    view = get_adapter("qwen3_moe").moe_blocks(tiny_model("qwen3_moe"))[0]
    excluded = torch.zeros(8, dtype=torch.bool)
    excluded[3] = True
    weights, indices = view.route(torch.randn(200, 64), excluded)
    assert not (indices == 3).any()
    torch.testing.assert_close(weights.sum(1), torch.ones(200))


@pytest.mark.parametrize("model_type,has_shared", [("qwen2_moe", True), ("deepseek_v3", True), ("qwen3_moe", False)])
def test_shared_experts_are_exposed(model_type, has_shared):
    view = get_adapter(model_type).moe_blocks(tiny_model(model_type))[0]
    assert (view.shared_experts is not None) == has_shared


def test_deepseek_dense_layers_are_not_moe_blocks():
    views = get_adapter("deepseek_v3").moe_blocks(tiny_model("deepseek_v3"))
    assert [v.layer_index for v in views] == [1, 2]


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="qwen3_moe") as info:
        get_adapter("llama")
    assert all(t in str(info.value) for t in supported_model_types())


def test_model_without_moe_layers_is_rejected():
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="no sparse MoE layers"):
        require_moe(dense, get_adapter("qwen3_moe"), "dense-qwen3")


def test_every_required_architecture_is_registered():
    assert {"qwen3_moe", "qwen3_vl_moe", "qwen2_moe", "mixtral", "deepseek_v3", "olmoe"} <= set(supported_model_types())
