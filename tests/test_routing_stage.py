"""The routing stage (stages/routing.py): a registered stage with its own recipe section and report."""

import math

import pytest

import moecompress
from moecompress.errors import RecipeError
from moecompress.recipe import Recipe
from moecompress.stages.routing import routing_balance

from .conftest import CALIB, require_shared


def test_balance_of_even_skewed_and_dead_routing():
    even = routing_balance([10, 10, 10, 10])
    assert even["entropy_bits"] == pytest.approx(2.0) and even["max_over_mean"] == pytest.approx(1.0)
    skewed = routing_balance([70, 10, 20, 0])
    expected = -sum(p * math.log2(p) for p in (0.7, 0.1, 0.2))
    assert skewed["entropy_bits"] == pytest.approx(expected) and skewed["max_over_mean"] == pytest.approx(2.8)
    assert skewed["unrouted"] == [3]


def test_the_section_is_part_of_the_recipe_and_checked():
    assert Recipe().routing.enabled is False and "routing" in Recipe().to_dict()
    with pytest.raises(RecipeError, match="routing reads the quantization reports"):
        Recipe.from_dict({"routing": {"enabled": True}, "quantization": {"method": "none"}})
    with pytest.raises(RecipeError, match="unknown key 'enable'"):
        Recipe.from_dict({"routing": {"enable": True}})


def test_compress_reports_the_routing_of_every_layer(tiny_text_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 2, "seq_len": 64},
            "quantization": {"method": "rtn"},
            "routing": {"enabled": True},
        }
    )
    report = moecompress.compress(str(tiny_text_path), recipe, progress=False).report
    rows = report.routing["layers"]
    assert [row["layer"] for row in rows] == [0, 1, 2, 3] and "routing" in report.stage_seconds
    assert all(0 < row["entropy_bits"] <= 4 and row["max_over_mean"] >= 1 for row in rows)  # 16 experts: <= 4 bits
    assert report.routing["unrouted_experts"] == sum(len(row["unrouted"]) for row in rows)
