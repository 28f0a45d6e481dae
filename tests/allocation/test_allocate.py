import pytest
import torch

from moecompress.allocation import CompressionPlan, allocate
from moecompress.allocation.allocate import storage_bits
from moecompress.calibration.stats import ExpertStats
from moecompress.errors import BudgetError, RecipeError
from moecompress.formats import IntFormat, ternary_format
from moecompress.recipe import Recipe


def profiled_stats() -> ExpertStats:
    """4 experts x 2 layers; expert 0 is frequent and sensitive, expert 3 is never routed."""
    stats = ExpertStats.empty("synthetic", [0, 1], num_experts=4, top_k=1)
    stats.tokens[:, :, 0] = torch.tensor([60.0, 25, 15, 0])
    stats.tokens[:, :, 1] = torch.tensor([0.0, 0, 10, 0])  # image tokens only go to expert 2
    stats.total_tokens[:] = torch.tensor([100.0, 10, 0])  # text, image, audio
    stats.weight_sum[:] = stats.tokens * 0.9
    stats.candidate_formats = [{"bits": b, "group_size": 128, "sym": False} for b in (2, 3, 4)]
    per_token = torch.tensor([8.0, 2.0, 0.5], dtype=torch.float64)  # error at 2/3/4 bits
    stats.profile_tokens = stats.tokens.sum(-1)
    stats.quant_error = stats.profile_tokens[:, :, None, None] * per_token[None, None, :, None].expand(2, 4, 3, 4)
    return stats


def config(**kw):
    return Recipe.from_dict({"allocation": {"method": "lp", "candidates": [2, 3, 4], **kw}}).allocation


def test_lp_spends_bits_on_important_experts_within_budget():
    plan = allocate(profiled_stats(), config(avg_bits=3.0, modality_weights={"text": 1.0, "image": 0.0}))
    per_expert = plan.bits[:, :, 0]
    assert plan.average_bits <= 3.0
    assert (per_expert[:, 0] == 4).all() and (per_expert[:, 3] == 2).all()


def test_image_importance_moves_bits_to_the_image_expert():
    both = allocate(profiled_stats(), config(avg_bits=3.0, modality_weights={"text": 1.0, "image": 1.0}))
    text = allocate(profiled_stats(), config(avg_bits=3.0, modality_weights={"text": 1.0, "image": 0.0}))
    assert (both.bits[:, 2, 0] == 4).all() and (text.bits[:, 2, 0] < 4).all()


def test_fixed_pattern_is_honoured():
    plan = allocate(profiled_stats(), config(avg_bits=2.75, fixed={r"layers\.1\.experts\.3$": 4}))
    assert plan.bits[1, 3, 0] == 4


def test_projection_granularity_allocates_each_projection():
    plan = allocate(profiled_stats(), config(avg_bits=3.0, granularity="projection"))
    assert plan.bits.shape == (2, 4, 3) and plan.average_bits <= 3.0


def test_infeasible_budget_is_a_budget_error():
    with pytest.raises(BudgetError, match="smallest feasible budget is 2"):
        allocate(profiled_stats(), config(avg_bits=1.5))


def test_unknown_allocation_values_are_recipe_errors():
    with pytest.raises(RecipeError, match="scope"):
        config(scope="model")
    with pytest.raises(RecipeError, match="modalit"):
        allocate(profiled_stats(), config(modality_weights={"audio": 1.0}))


def test_plan_round_trips_through_json(tmp_path):
    plan = allocate(profiled_stats(), config(avg_bits=3.0))
    plan.save(tmp_path / "plan.json")
    again = CompressionPlan.load(tmp_path / "plan.json")
    assert torch.equal(again.bits, plan.bits) and again.layer_formats(1)[0]["down_proj"].bits == int(plan.bits[1, 0, 2])
    assert "layer" in plan.table()


def test_byte_budget_converts_to_average_bits_and_names_the_smallest():
    from moecompress.allocation.allocate import avg_bits_for_bytes

    params = 1_000_000
    candidates = [IntFormat(b) for b in (2, 3, 4)]
    avg = avg_bits_for_bytes(100_000 + params * (3 + 24 / 128) // 8, 100_000, params, candidates, IntFormat(4))
    assert avg == pytest.approx(3.0, abs=1e-4)
    with pytest.raises(BudgetError, match="smallest feasible budget is 373438 bytes"):
        avg_bits_for_bytes(300_000, 100_000, params, candidates, IntFormat(4))


def with_ternary(stats: ExpertStats) -> ExpertStats:
    """Adds a ternary base-3 candidate with an error between 2 and 3 bits to `profiled_stats`."""
    stats.candidate_formats = [ternary_format(128).to_dict()] + stats.candidate_formats
    ternary_error = stats.quant_error[:, :, :1] * 1.5
    stats.quant_error = torch.cat([ternary_error, stats.quant_error], dim=2)
    return stats


def test_ternary_is_an_allocation_candidate_charged_its_true_size():
    stats = with_ternary(profiled_stats())
    plan = allocate(stats, config(avg_bits=2.0, candidates=["ternary", 2, 3, 4]))
    names = {plan.formats[int(i)].name for i in plan.choice.unique()}
    assert "ternary-g128-base3" in names
    # ternary costs 1.6 + 16/128 bits, int2 2 + 24/128: the budget of all-int2 must buy something above 2 bits
    assert plan.bits.max() > 2 and plan.bits.min() == pytest.approx(1.6)
    storage = sum(storage_bits(plan.formats[int(i)]) for i in plan.choice.flatten()) / plan.choice.numel()
    assert storage <= 2 + 24 / 128 + 1e-9
    with pytest.raises(BudgetError, match="smallest feasible budget is 1.53"):
        allocate(stats, config(avg_bits=1.5, candidates=["ternary", 2, 3, 4]))


def test_blocks_of_different_expert_sizes_are_charged_their_sizes():
    """ERNIE-4.5-VL's vision experts are a third of its text experts' size: the budget counts parameters, so at the
    same error the smaller block's experts are the cheaper upgrade, and the parameter-weighted mean is the budget."""
    stats = profiled_stats()
    stats.tokens[:, :, 0], stats.tokens[:, :, 1] = 25.0, 0.0  # every expert alike but block 0's errors are 20 %
    stats.weight_sum[:] = stats.tokens * 0.9  # larger: counting experts, not parameters, it would get the bits
    stats.profile_tokens = stats.tokens.sum(-1)
    error = stats.profile_tokens[:, :, None] * torch.tensor([8.0, 2.0, 0.5]) * torch.tensor([1.2, 1.0])[:, None, None]
    stats.quant_error = error[..., None].expand(2, 4, 3, 4).contiguous()
    stats.expert_params = [3000, 1000]
    plan = allocate(stats, config(avg_bits=3.0, candidates=[2, 4], scope="global"))
    bits = plan.bits[:, :, 0].double()
    weighted = float((bits * torch.tensor([[3.0], [1.0]])).sum() / (4 * 4))
    assert weighted <= 3.0 + 1e-9
    assert (bits[1] == 4).all() and float(bits[0].mean()) < 3  # the small block's upgrades come first
    assert weighted > 3.0 - 0.75  # and the budget is spent: less than one big upgrade is left


def test_layer_granularity_gives_every_expert_of_a_layer_one_format():
    stats = profiled_stats()
    stats.quant_error[1] *= 10  # layer 1 is the sensitive one
    plan = allocate(stats, config(avg_bits=3.0, granularity="layer", scope="global"))
    assert (plan.bits[1] == 4).all() and (plan.bits[0] == 2).all()


def test_layer_projection_granularity_gives_a_projection_one_format_across_experts():
    stats = profiled_stats()
    stats.quant_error[..., 2] *= 10  # the down projections are the sensitive ones
    plan = allocate(stats, config(avg_bits=3.0, granularity="layer-projection", scope="global"))
    assert plan.average_bits <= 3.0
    for layer in range(2):
        for p in range(3):
            assert len(set(plan.bits[layer, :, p].tolist())) == 1
        assert (plan.bits[layer, :, 2] == 4).all()


def test_layer_granularity_is_an_lp_option():
    with pytest.raises(RecipeError, match="method lp only"):
        config(granularity="layer", method="frequency", scope="global")
