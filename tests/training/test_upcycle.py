import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from moecompress.errors import UnsupportedModelError
from moecompress.models import get_adapter
from moecompress.training.upcycle import upcycle_dense_to_mote

from ..models.tiny_models import COMMON, tiny_model


def tiny_dense():
    torch.manual_seed(0)
    config = Qwen2Config(**COMMON)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_upcycled_model_computes_the_dense_function_with_the_ffn_as_shared_expert():
    dense = tiny_dense()
    moe = upcycle_dense_to_mote(dense, num_experts=4, top_k=2, routed_share=0.5)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        ref, out = dense(input_ids=ids).logits, moe(input_ids=ids).logits
    assert float((out - ref).norm() / ref.norm()) < 1e-5
    views = get_adapter(moe.config.model_type).moe_blocks(moe)
    assert len(views) == 2 and views[0].num_experts == 4 and views[0].shared_experts is not None
    assert torch.equal(views[0].shared_experts.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)


def test_upcycling_refuses_a_model_that_is_not_dense_qwen2():
    with pytest.raises(UnsupportedModelError, match="qwen2"):
        upcycle_dense_to_mote(tiny_model("mixtral"))
