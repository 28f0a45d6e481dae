import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from moecompress.errors import UnsupportedModelError
from moecompress.models import get_adapter, supported_model_types
from moecompress.models.generic import GenericAdapter
from moecompress.models.loading import require_moe

from ..conftest import CALIB
from .tiny_models import CONFIGS, routed_by_hand, tiny_model


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_adapter_routing_reproduces_the_model_router(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model_type)
    views = adapter.moe_blocks(model)
    assert views and all(v.num_experts == 8 and v.top_k == 2 for v in views)
    x = torch.randn(50, 64)
    for view in views:
        extra = [view.block.e_score_correction_bias] if model_type == "minimax_m2" else []  # the block holds it
        _, ref_weights, ref_indices = view.router(x, *extra)
        weights, indices = view.route(x)
        order_ref, order = ref_indices.sort(dim=1), indices.sort(dim=1)
        assert torch.equal(order_ref.values, order.values)
        torch.testing.assert_close(
            ref_weights.gather(1, order_ref.indices), weights.gather(1, order.indices).to(ref_weights.dtype)
        )


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_per_expert_view_reproduces_the_fused_experts_output(model_type):
    model = tiny_model(model_type)
    view = get_adapter(model_type).moe_blocks(model)[0]
    x = torch.randn(40, 64)
    weights, indices = view.route(x)
    manual = routed_by_hand(view, x, indices, weights)
    torch.testing.assert_close(view.routed_forward(x, indices, weights), manual, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama4_text", "llama4"])
def test_llama4_blocks_in_the_common_form_keep_the_original_outputs(model_type):
    """Viewing a Llama 4 block gives its router, experts and forward the common (index, weights) form: the block's
    output and the model's logits stay those of transformers' own dense forward, which runs every expert on the
    input scaled by its sigmoid router score; scaling the outputs instead would be far off."""
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    ids = torch.randint(3, 120, (2, 24))
    x = torch.randn(30, 64)
    view = get_adapter(model_type).moe_blocks(model)[0]
    reference_block = original.get_submodule(view.name)
    with torch.no_grad():
        expected, _ = reference_block(x)
        out, _ = view.block(x)
        weights, indices = view.route(x)
        output_scaled = view.shared_experts(x) + view.experts(x, indices, weights)
        assert rel_err(model(input_ids=ids).logits, original(input_ids=ids).logits) < 1e-5
    assert type(view.block).__name__ == "RoutedLlama4TextMoe"
    assert rel_err(out, expected) < 1e-5
    assert rel_err(output_scaled, expected) > 1e-2


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
    with pytest.raises(UnsupportedModelError, match="not a Mixture-of-Experts that transformers builds") as info:
        get_adapter("llama")
    assert all(t in str(info.value) for t in supported_model_types())


def test_model_without_moe_layers_is_rejected():
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    dense = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="no sparse MoE layers"):
        require_moe(dense, get_adapter("qwen3_moe"), "dense-qwen3")


def test_every_required_architecture_has_an_adapter():
    """Family files for the deviations, the generic adapter for the rest."""
    assert {"qwen3_vl_moe", "deepseek_v2", "llama4", "gpt_oss"} <= set(supported_model_types())
    assert all(isinstance(get_adapter(t), GenericAdapter) for t in ("qwen3_moe", "deepseek_v3", "kimi_k25", "mixtral"))


PLUGIN = """
from moecompress.models.base import ModelAdapter


class TaggedQwen3(ModelAdapter):
    model_types = ("qwen3_moe",)
    seen = []

    def moe_blocks(self, model):
        TaggedQwen3.seen.append(type(model).__name__)
        return super().moe_blocks(model)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A third-party adapter module on sys.path; the registry restored afterwards."""
    from moecompress.models import registry

    (tmp_path / "moe_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "moe_plugin", raising=False)
    registry.supported_model_types()  # built-ins discovered before the copy
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    return registry


def test_an_adapter_plugin_given_by_option_is_used(plugin, tiny_text_path, tmp_path):
    from moecompress.cli import main

    out = tmp_path / "o"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"calibration: {{dataset: {CALIB}, num_samples: 2, seq_len: 64}}\nquantization: {{method: rtn}}\n"
    )
    assert (
        main(
            [
                "compress",
                str(tiny_text_path),
                "--recipe",
                str(recipe),
                "-o",
                str(out),
                "--adapter",
                "moe_plugin:TaggedQwen3",
            ]
        )
        == 0
    )
    import moe_plugin

    assert (
        "Qwen3MoeForCausalLM" in moe_plugin.TaggedQwen3.seen
        and type(get_adapter("qwen3_moe")).__name__ == "TaggedQwen3"
    )


def test_installed_plugins_are_found_through_their_entry_point(plugin, tmp_path, monkeypatch):
    dist = tmp_path / "moe_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[moecompress.adapters]\ntagged = moe_plugin:TaggedQwen3\n")
    monkeypatch.setattr(plugin, "_discovered", False)
    assert type(get_adapter("qwen3_moe")).__name__ == "TaggedQwen3"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module:X", "No module named"),
        ("moe_plugin:Missing", "Missing"),
        ("json:dumps", "neither a ModelAdapter"),
    ],
)
def test_a_bad_adapter_option_is_one_line(plugin, spec, message, capsys, tmp_path):
    from moecompress.cli import main

    assert main(["compress", "some/model", "-o", str(tmp_path / "o"), "--adapter", spec]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_every_file_of_the_models_package_is_an_adapter_found_without_an_import_list():
    from pathlib import Path

    import moecompress.models as models

    files = {p.stem for p in Path(models.__file__).parent.glob("*.py")} - {
        "__init__",
        "base",
        "generic",
        "loading",
        "registry",
        "streaming",
    }
    found = {type(get_adapter(t)).__module__.rsplit(".", 1)[1] for t in supported_model_types()}
    assert files <= found
