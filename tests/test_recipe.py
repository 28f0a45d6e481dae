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
