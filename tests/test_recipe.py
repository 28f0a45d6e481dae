import re
from pathlib import Path

import pytest

from moecompress.errors import RecipeError
from moecompress.recipe import Recipe

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    recipe = Recipe.from_yaml(path)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(RecipeError, match="unknown key 'bitz'.*Did you mean 'bits'"):
        Recipe.from_dict({"quantization": {"bitz": 3}})


def test_wrong_type_and_bad_values_are_rejected():
    with pytest.raises(RecipeError, match="expected int"):
        Recipe.from_dict({"quantization": {"bits": "four"}})
    with pytest.raises(RecipeError, match="bits 5"):
        Recipe.from_dict({"quantization": {"bits": 5}})
    with pytest.raises(RecipeError, match="policy"):
        Recipe.from_dict({"quantization": {"rare_experts": {"policy": "ignore"}}})


def test_missing_recipe_file_lists_the_shipped_ones(tmp_path):
    with pytest.raises(RecipeError, match="gptq-w4g128.yaml"):
        Recipe.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "section, bad, named",
    [
        ({"allocation": {"avg_bits": float("nan")}}, {}, "allocation.avg_bits: expected a finite number"),
        ({"recovery": {"lr": float("inf")}}, {}, "recovery.lr: expected a finite number"),
        ({"allocation": {"method": "lp"}}, {"alpha": -3.0}, "allocation.alpha -3.0"),
        ({"factor": {"enabled": True}}, {"beta": -1.0}, "factor.alpha 1.0 / beta -1.0"),
        ({"merge": {"method": "prune"}}, {"beam": 0}, "beam 0"),
        ({"merge": {"method": "prune"}}, {"sample_tokens": -1}, "merge.sample_tokens -1"),
        ({"merge": {"method": "average"}}, {"max_cluster_size": 0}, "max_cluster_size 0"),
        ({"merge": {"method": "average"}}, {"modality_weights": {"txt": 1.0}}, "merge.modality_weights"),
        ({"merge": {"method": "average"}}, {"modality_weights": {"text": -1.0}}, "merge.modality_weights"),
        ({"allocation": {"method": "lp"}}, {"modality_weights": {"vision": 1.0}}, "allocation.modality_weights"),
        ({"quantization": {"method": "gptq"}}, {"rare_experts": {"min_tokens": -1}}, "min_tokens -1"),
        ({"recovery": {"enabled": True}}, {"num_samples": 0}, "recovery: num_samples"),
        ({"recovery": {"enabled": True}}, {"seq_len": 0}, "recovery: num_samples"),
        ({"recovery": {"enabled": True}}, {"batch_size": -1}, "recovery: num_samples"),
        ({"recovery": {"enabled": True}}, {"scale_lr": -1.0}, "recovery.scale_lr -1.0"),
        ({"slim": {"enabled": True}}, {"vl_num_samples": -1}, "slim: num_samples"),
        ({"slim": {"enabled": True}}, {"hidden_weight": -1.0}, "slim: hidden_weight"),
        ({"slim": {"enabled": True}}, {"warmup_steps": -1}, "slim: hidden_weight, warmup_steps"),
        ({"slim": {"enabled": True}}, {"lr": 0.0}, "slim.lr 0.0"),
        ({"recovery": {"enabled": True}}, {"min_lr_ratio": 2.0}, "recovery.min_lr_ratio 2.0"),
        ({"recovery": {"enabled": True}}, {"steps": 0}, "recovery: steps 0"),
    ],
)
def test_out_of_range_numbers_are_rejected_by_name(section, bad, named):
    """Each of these once passed validation and ended in a traceback (or ran with a meaningless value)."""
    ((name, values),) = section.items()
    with pytest.raises(RecipeError, match=re.escape(named)):
        Recipe.from_dict({name: {**values, **bad}})


def test_max_cluster_size_that_cannot_hold_the_experts_names_the_smallest_that_can():
    from moecompress.merge.apply import MergeConfig

    config = MergeConfig(method="average", ratio=0.5, max_cluster_size=1).validate()
    with pytest.raises(RecipeError, match="raise it to 2 or more"):
        config.kept(16, 2)
