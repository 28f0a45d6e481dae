"""The generic adapter: a family that transformers learns about at test time (a copy of Qwen3-MoE under a new name
whose experts are stored transposed) runs through the layer-wise engine, the streamed pipeline and both loaders with
no family file; layouts, routing recognition and refusals."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

import moecompress
from moecompress.calibration.data import CalibrationBatch
from moecompress.errors import UnsupportedModelError
from moecompress.models import get_adapter
from moecompress.models.base import PROJECTIONS
from moecompress.models.generic import GenericAdapter
from moecompress.quant.rtn import quantize_rtn
from moecompress.recipe import Recipe
from tests.models.sweep import rel
from tests.models.tiny_models import COMMON, CONFIGS, walked_states

NEW_TYPE = "moecompress_test_moe"


@use_experts_implementation(is_transposed=True)
class TransposedExperts(nn.Module):
    """Qwen3-MoE's experts stored as [E, H, 2I] and [E, I, H]."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, hidden, inter = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, hidden, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, inter, hidden))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in top_k_index.unique().tolist():
            tok, slot = torch.where(top_k_index == e)
            gate, up = (hidden_states[tok] @ self.gate_up_proj[e]).chunk(2, dim=-1)
            y = (self.act_fn(gate) * up) @ self.down_proj[e]
            out.index_add_(0, tok, y * top_k_weights[tok, slot, None])
        return out


class NewMoeConfig(Qwen3MoeConfig):
    model_type = NEW_TYPE


class NewMoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = NewMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.experts = TransposedExperts(config)
        self.post_init()


@pytest.fixture(scope="module")
def new_family():
    AutoConfig.register(NEW_TYPE, NewMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(NewMoeConfig, NewMoeForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    model = NewMoeForCausalLM(NewMoeConfig(**COMMON, **CONFIGS["qwen3_moe"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def _batches(n: int = 2) -> list[CalibrationBatch]:
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 110, (2, 24), generator=gen) for _ in range(n)]
    return [
        CalibrationBatch({"input_ids": i, "attention_mask": torch.ones_like(i)}, torch.zeros_like(i).bool())
        for i in ids
    ]


def test_a_new_family_is_found_and_laid_out(new_family):
    adapter = get_adapter(NEW_TYPE)
    assert isinstance(adapter, GenericAdapter)
    views = adapter.moe_blocks(new_family)
    assert [v.name for v in views] == [f"model.layers.{i}.mlp" for i in range(2)]
    view = views[1]
    assert (view.num_experts, view.hidden_size, view.top_k, view.intermediate_size) == (8, 64, 2, 32)
    experts = view.experts
    w = view.expert_weights(3)  # transposed storage read back as [I, H] / [H, I]
    torch.testing.assert_close(w.gate_proj, experts.gate_up_proj[3, :, :32].t())
    torch.testing.assert_close(w.down_proj, experts.down_proj[3].t())
    x = torch.randn(5, 64, dtype=torch.float64)
    reference = F.linear(
        F.silu(F.linear(x, w.gate_proj.double())) * F.linear(x, w.up_proj.double()), w.down_proj.double()
    )
    assert rel(view.expert_forward(3, x.float())[1], reference) < 1e-5
    changed = w.replace(up_proj=torch.randn_like(w.up_proj))
    with torch.no_grad():
        view.set_expert_weights(3, changed)
    torch.testing.assert_close(view.expert_weights(3).up_proj, changed.up_proj)
    with torch.no_grad():
        view.set_expert_weights(3, w)


def test_engine_matches_forward_and_recognizes_routing(new_family):
    adapter = get_adapter(NEW_TYPE)
    batch = _batches(1)[0]
    walked = walked_states(new_family, adapter, [batch])
    with torch.no_grad():
        real = new_family(**batch.inputs, output_hidden_states=True).hidden_states
    assert max(rel(walked[i][0], real[i + 1]) for i in range(len(walked) - 1)) < 1e-5
    assert adapter.rule == ("softmax", True)  # Qwen3-MoE's router: softmax, top-k renormalised (norm_topk_prob)
    view = adapter.moe_blocks(new_family)[0]
    x = torch.randn(16, 64)
    excluded = torch.zeros(8, dtype=torch.bool)
    excluded[[0, 5]] = True
    weights, indices = view.route(x, excluded)
    assert not torch.isin(indices, torch.tensor([0, 5])).any()
    torch.testing.assert_close(weights.sum(-1), torch.ones(16))


def test_streamed_rtn_round_trip_and_both_loaders(new_family, tmp_path):
    new_family.save_pretrained(tmp_path / "src")
    recipe = Recipe.from_dict({"quantization": {"method": "rtn", "bits": 4, "group_size": 16}})
    with mock.patch("moecompress.pipeline.calibration_batches", lambda *a, **k: _batches()):
        moecompress.compress(str(tmp_path / "src"), recipe, tmp_path / "out", progress=False)
    loaded = moecompress.load(tmp_path / "out")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(3, 110, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, theirs(input_ids=ids).logits)
    source, packed = get_adapter(NEW_TYPE).moe_blocks(new_family)[0], get_adapter(NEW_TYPE).moe_blocks(loaded)[0]
    fmt = recipe.quantization.format
    for e in range(8):
        for p in PROJECTIONS:
            expected = quantize_rtn(source.expert_weights(e)[p].detach().float(), fmt).dequantize()
            assert torch.equal(packed.expert_weights(e)[p], expected), (e, p)


def test_unrecognized_routing_is_refused_in_one_line(new_family):
    adapter = get_adapter(NEW_TYPE)
    view = adapter.moe_blocks(new_family)[0]
    x = torch.randn(32, 64)
    weights, indices = torch.rand(32, 2), torch.randint(0, 8, (32, 2))  # no rule gives these
    adapter.recognize_routing(view.block, x, weights, indices)
    with pytest.raises(UnsupportedModelError, match="no routing rule of the generic adapter reproduces its router"):
        view.route(x)


def test_dense_and_unknown_types_are_refused():
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts that transformers builds"):
        get_adapter("llama")
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts"):
        get_adapter("no_such_model_type")
