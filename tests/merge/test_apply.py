import pytest
import torch

import moecompress
from moecompress.calibration.data import CalibrationBatch
from moecompress.errors import RecipeError
from moecompress.io.checkpoint import save_checkpoint
from moecompress.merge.apply import MappedExperts, MergeConfig, reduce_experts
from moecompress.models import get_adapter
from moecompress.models.loading import LoadedModel

from ..models.tiny_models import tiny_model


def loaded(model_type: str) -> LoadedModel:
    model = tiny_model(model_type)
    return LoadedModel(model, get_adapter(model_type), f"tiny-{model_type}")


def batches(vocab: int) -> list[CalibrationBatch]:
    g = torch.Generator().manual_seed(1)
    return [
        CalibrationBatch(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids, dtype=torch.bool)
        )
        for ids in (torch.randint(0, vocab, (4, 32), generator=g) for _ in range(3))
    ]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "llama4_text", "ernie4_5_moe"])
@pytest.mark.parametrize("method", ["prune", "subspace"])
def test_reduced_models_shrink_the_router_and_reload_identically(model_type, method, tmp_path):
    lm = loaded(model_type)
    reductions = reduce_experts(lm, batches(128), MergeConfig(method=method, ratio=0.25), progress=False)
    views = lm.adapter.moe_blocks(lm.model)
    assert [r.kept for r in reductions] == [6] * len(views)
    assert all(v.router.weight.shape[0] == 6 and v.experts.gate_up_proj.shape[0] == 6 for v in views)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    save_checkpoint(lm.model, tmp_path / "m", "merge: {}", lm.source, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(moecompress.load(tmp_path / "m")(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_pruning_keeps_the_layer_output_closer_than_dropping_experts_at_random():
    lm = loaded("qwen3_moe")
    data = batches(lm.model.config.vocab_size)
    ids = data[0].inputs["input_ids"]
    with torch.no_grad():
        reference = lm.model(input_ids=ids).logits
    reduce_experts(lm, data, MergeConfig(method="prune", ratio=0.25), progress=False)
    random_drop = loaded("qwen3_moe")
    for view in random_drop.adapter.moe_blocks(random_drop.model):
        keep = torch.randperm(8, generator=torch.Generator().manual_seed(view.layer_index))[:6]
        view.router.weight.data = view.router.weight.data[keep]
        view.experts.gate_up_proj.data = view.experts.gate_up_proj.data[keep]
        view.experts.down_proj.data = view.experts.down_proj.data[keep]
        view.router.num_experts = view.experts.num_experts = 6
    with torch.no_grad():
        pruned_err = (lm.model(input_ids=ids).logits - reference).norm()
        random_err = (random_drop.model(input_ids=ids).logits - reference).norm()
    assert pruned_err < random_err


def test_keep_router_mode_maps_every_original_slot_to_a_merged_expert(tmp_path):
    lm = loaded("qwen3_moe")
    reduce_experts(
        lm, batches(lm.model.config.vocab_size), MergeConfig(method="average", ratio=0.5, router="keep"), progress=False
    )
    block = lm.adapter.moe_blocks(lm.model)[0].block
    assert isinstance(block.experts, MappedExperts) and block.gate.weight.shape[0] == 8
    assert sorted(set(block.experts.slot_map.tolist())) == [0, 1, 2, 3]
    ids = torch.randint(0, 128, (1, 8))
    save_checkpoint(lm.model, tmp_path / "keep", "merge: {}", lm.source, dtype=torch.float32)
    again = moecompress.load(tmp_path / "keep")
    assert again.model.layers[0].mlp.experts.experts.gate_up_proj.shape[0] == 4
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, lm.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_pruning_and_merging_carry_the_routers_selection_bias():
    """ERNIE-4.5's router chooses experts on probabilities plus a per-expert bias (`moe_statics`): pruning keeps the
    kept experts' biases, merging gives each merged expert its members' frequency-weighted mean, like the rows."""
    for method in ("prune", "average"):
        lm = loaded("ernie4_5_moe")
        before = [v.router.moe_statics.e_score_correction_bias.clone() for v in lm.adapter.moe_blocks(lm.model)]
        reductions = reduce_experts(lm, batches(128), MergeConfig(method=method, ratio=0.25), progress=False)
        for view, old, reduction in zip(lm.adapter.moe_blocks(lm.model), before, reductions):
            bias = view.router.moe_statics.e_score_correction_bias
            assert bias.shape == (1, 6)
            if method == "prune":
                kept = [e for e, slot in enumerate(reduction.slot_map) if slot >= 0]
                assert torch.equal(bias, old[:, kept])
            else:  # each merged bias lies within its members' range
                for c in range(6):
                    members = old[0, torch.tensor(reduction.slot_map) == c]
                    assert members.min() - 1e-6 <= bias[0, c] <= members.max() + 1e-6


def test_modality_groups_are_reduced_apart_and_reload(tmp_path):
    """ERNIE-4.5-VL: the text and the vision experts of each layer are pruned as separate sets, each on its own
    tokens (images in the calibration batch), and the reduced model reloads with the same logits."""
    from ..calibration.test_engine import image_batch

    lm = loaded("ernie4_5_vl_moe")
    batch = image_batch(lm.model)
    reductions = reduce_experts(lm, [batch], MergeConfig(method="prune", ratio=0.25), progress=False)
    views = lm.adapter.moe_blocks(lm.model)
    assert [r.layer for r in reductions] == ["1.text", "1.image", "2.text", "2.image"]
    assert all(v.num_experts == 6 and v.experts.gate_up_proj.shape[0] == 6 for v in views)
    with torch.no_grad():
        logits = lm.model(**batch.inputs).logits
    save_checkpoint(lm.model, tmp_path / "m", "merge: {}", lm.source, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(moecompress.load(tmp_path / "m")(**batch.inputs).logits, logits, rtol=1e-5, atol=1e-5)
    text_only = loaded("ernie4_5_vl_moe")
    with pytest.raises(RecipeError, match="block 1.image; its experts take image tokens alone"):
        reduce_experts(text_only, batches(128), MergeConfig(method="prune", ratio=0.25), progress=False)
