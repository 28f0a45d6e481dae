import pytest
import torch

import moecompress
from moecompress.dynamic.rules import top_slot
from moecompress.dynamic.skip import SkipConfig, calibration_kl, fit_skipping
from moecompress.merge.apply import MappedExperts
from moecompress.models import load_model
from moecompress.pipeline import calibration_batches
from moecompress.recipe import Recipe

from ..conftest import CALIB, WIKI, require_shared

SMALL_CALIBRATION = {"dataset": str(CALIB), "num_samples": 8, "seq_len": 128, "batch_size": 2}


@pytest.fixture(scope="module")
def text_model_and_batches(tiny_text_path):
    require_shared(CALIB)
    loaded = load_model(str(tiny_text_path))
    return loaded, calibration_batches(loaded, Recipe.from_dict({"calibration": SMALL_CALIBRATION}).calibration)


def test_odp_hits_the_target_ratio_and_beats_random_skipping_at_the_same_ratio(text_model_and_batches):
    loaded, batches = text_model_and_batches
    controller = fit_skipping(
        loaded.model, loaded.adapter, batches, SkipConfig(method="odp", target=0.3), progress=False
    )
    try:
        controller.reset_stats()
        odp_kl = calibration_kl(controller, batches)
        assert abs(controller.stats.skipped() - 0.3) < 0.03
        generator = torch.Generator().manual_seed(0)
        controller._keep = lambda position, view, hidden, w, image: (
            top_slot(w) | (torch.rand(w.shape, generator=generator) > 0.6)
        )
        controller.reset_stats()
        random_kl = calibration_kl(controller, batches)
        assert abs(controller.stats.skipped() - 0.3) < 0.03
        assert 0 < odp_kl < 0.7 * random_kl
    finally:
        controller.remove()


@pytest.mark.parametrize("method", ["odp", "modes", "learned"])
def test_fitted_skipping_is_stored_in_the_checkpoint_and_applied_by_the_loader(method, tiny_text_path, tmp_path):
    require_shared(CALIB)
    recipe = Recipe.from_dict(
        {
            "name": f"skip-{method}",
            "calibration": SMALL_CALIBRATION,
            "quantization": {"method": "none"},
            "skip": {"method": method, "target": 0.25, "steps": 4},
        }
    )
    result = moecompress.compress(str(tiny_text_path), recipe, output=tmp_path / "m", progress=False)
    assert result.report.skip["method"] == method
    held_out = calibration_batches(
        result.loaded,
        Recipe.from_dict({"calibration": {**SMALL_CALIBRATION, "dataset": str(WIKI), "num_samples": 2}}).calibration,
    )
    ids = held_out[0].inputs["input_ids"]
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits
        with result.model.skip_controller.set_mode("off"):
            unskipped = result.model(input_ids=ids).logits
    model = moecompress.load(tmp_path / "m")
    assert model.skip_controller.rule.to_dict() == result.report.skip
    model.skip_controller.reset_stats()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert abs(model.skip_controller.stats.skipped() - 0.25) < 0.1  # fitted on other text
    # weights are stored in bf16: compare to the in-memory model by relative error, well below what skipping changes
    err = (logits - expected).norm() / expected.norm()
    assert err < 0.02 < (unskipped - expected).norm() / expected.norm()


def test_mapped_experts_pass_skipped_pairs_through_as_no_expert():
    from moecompress.runtime.packed_experts import ExpertList

    class Square(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = torch.nn.Identity()
            self.down_proj = torch.nn.Linear(4, 4, bias=False)

    inner = ExpertList([Square() for _ in range(2)], 4, 4, torch.nn.Identity())
    mapped = MappedExperts(inner, torch.tensor([0, 1, 1, 0]))
    x = torch.randn(3, 4)
    w = torch.rand(3, 2)
    full = mapped(x, torch.tensor([[0, 2], [1, 3], [2, 0]]), w)
    skipped = mapped(x, torch.tensor([[0, 4], [4, 3], [2, 0]]), w * torch.tensor([[1, 0], [0, 1], [1, 1]]))
    d0 = inner[0].down_proj
    with torch.no_grad():
        assert torch.allclose(skipped[0], d0(x[0] * x[0]) * w[0, 0], atol=1e-6)
        assert torch.allclose(skipped[1], d0(x[1] * x[1]) * w[1, 1], atol=1e-6)
        assert torch.allclose(skipped[2], full[2])


@pytest.mark.slow
def test_modes_fits_separate_text_and_image_thresholds_on_the_vl_model():
    from ..conftest import SHAPES, TINY_VL

    require_shared(TINY_VL)
    loaded = load_model(str(TINY_VL), trust_remote_code=True)
    recipe = Recipe.from_dict(
        {
            "calibration": {
                **SMALL_CALIBRATION,
                "vl_dataset": str(require_shared(SHAPES) / "calib.jsonl"),
                "vl_num_samples": 16,
            }
        }
    )
    batches = calibration_batches(loaded, recipe.calibration, trust_remote_code=True)
    controller = fit_skipping(
        loaded.model, loaded.adapter, batches, SkipConfig(method="modes", target=0.3, frontier_points=3), progress=False
    )
    rule = controller.rule
    assert rule.tau["text"] != rule.tau["image"] and rule.alpha["image"] != rule.alpha["text"]
    controller.reset_stats()
    per_modality_kl = calibration_kl(controller, batches)
    stats = controller.stats
    assert abs(stats.skipped() - 0.3) < 0.05 and stats.total["image"] > 0
    shared = fit_skipping(
        loaded.model,
        loaded.adapter,
        batches,
        SkipConfig(method="modes", target=0.3, per_modality=False),
        progress=False,
    )
    assert shared.rule.tau["text"] == shared.rule.tau["image"]
    # the frontier search includes (close to) the shared split, so it cannot be much worse
    assert per_modality_kl <= shared.rule.calibration_kl * 1.05


def test_skipped_pairs_are_exact_zeros_in_every_transformers_experts_implementation(text_model_and_batches):
    loaded, batches = text_model_and_batches
    controller = fit_skipping(
        loaded.model, loaded.adapter, batches[:1], SkipConfig(method="odp", target=0.4), progress=False
    )
    ids = batches[0].inputs["input_ids"][:1]
    try:
        outputs = {}
        for implementation in ("eager", "grouped_mm", "batched_mm"):
            loaded.model.set_experts_implementation(implementation)
            with torch.no_grad():
                outputs[implementation] = loaded.model(input_ids=ids).logits
        assert all(torch.isfinite(o).all() for o in outputs.values())
        for o in outputs.values():
            assert (o - outputs["eager"]).norm() / outputs["eager"].norm() < 1e-4
    finally:
        loaded.model.set_experts_implementation("grouped_mm")
        controller.remove()


def test_llama4_skipping_runs_through_its_router_and_input_scaled_experts():
    """Llama 4's blocks take the common router output, so the skip hooks apply: with ODP the block computes the
    shared expert plus the kept experts, each on its scaled input; dropping every expert of the layer leaves the
    shared expert alone."""
    from moecompress.dynamic.rules import ratio_keep
    from moecompress.dynamic.skip import SkipController, SkipRule
    from moecompress.models import get_adapter

    from ..models.tiny_models import tiny_model

    model, adapter = tiny_model("llama4_text"), get_adapter("llama4_text")
    view = adapter.moe_blocks(model)[0]
    controller = SkipController(model, adapter, SkipRule("odp", 0.5, beta=[0.999, 0.999]))
    x = torch.randn(1, 20, 64)
    try:
        with torch.no_grad():
            kept, _ = view.block(x)
            with controller.set_mode(("drop", 0, "text")):
                dropped, _ = view.block(x)
            weights, indices = view.route(x[0])
            keep = ratio_keep(weights, 0.999)
            expected = view.shared_experts(x[0]) + view.routed_forward(
                x[0], indices.masked_fill(~keep, view.num_experts), weights.masked_fill(~keep, 0)
            )
            full = view.shared_experts(x[0]) + view.routed_forward(x[0], indices, weights)
            shared = view.shared_experts(x[0])
    finally:
        controller.remove()
    assert 0 < int((~keep).sum()) < keep.numel() // 2  # some tokens lose their second expert
    assert torch.allclose(kept, expected, atol=1e-5) and not torch.allclose(kept, full, atol=1e-3)
    assert torch.allclose(dropped, shared, atol=1e-6)


def test_skipping_counts_each_modality_groups_tokens_under_its_modality():
    """ERNIE-4.5-VL's vision routers see only image tokens and its text routers only text tokens: the skip
    statistics count them so (2 MoE layers x top-2), and dropping the image modality at the vision block of layer 1
    leaves out all of its pairs and changes the logits."""
    from moecompress.dynamic.skip import SkipController, SkipRule
    from moecompress.models import get_adapter

    from ..calibration.test_engine import image_batch
    from ..models.tiny_models import tiny_model

    model, adapter = tiny_model("ernie4_5_vl_moe"), get_adapter("ernie4_5_vl_moe")
    batch = image_batch(model)
    images, tokens = int(batch.image_mask.sum()), batch.image_mask.numel()
    controller = SkipController(model, adapter, SkipRule("odp", 0.0, beta=[0.0] * 4))
    try:
        with torch.no_grad():
            model(**batch.inputs)
            assert int(controller.stats.total["image"]) == images * 2 * 2
            assert int(controller.stats.total["text"]) == (tokens - images) * 2 * 2
            assert int(controller.stats.kept["image"]) == images * 2 * 2  # beta 0 keeps everything
            full = model(**batch.inputs).logits
            controller.reset_stats()
            with controller.set_mode(("drop", 1, "image")):  # position 1: layer 1's vision block, alone counted
                dropped = model(**batch.inputs).logits
            assert int(controller.stats.total["image"]) == images * 2 and int(controller.stats.kept["image"]) == 0
            assert int(controller.stats.total["text"]) == 0
            assert float((dropped - full).norm() / full.norm()) > 1e-3
    finally:
        controller.remove()
