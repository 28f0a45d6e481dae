import json

import torch

import moecompress
from moecompress.recipe import Recipe
from moecompress.runtime import PackedLinear

from .conftest import CALIB, require_shared


def test_lp_mixed_precision_compresses_saves_and_reloads(tiny_text_path, tmp_path):
    recipe = Recipe.from_dict({
        "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 8, "seq_len": 256},
        "allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4], "profile_tokens": 512},
    })
    result = moecompress.compress(str(tiny_text_path), recipe, output=tmp_path / "mc", progress=False)
    bits = {m.fmt.bits for m in result.model.modules() if isinstance(m, PackedLinear)}
    assert len(bits) > 1
    assert result.report.code_bits_per_expert_param <= 2.5
    plan = json.loads((tmp_path / "mc" / "plan.json").read_text())
    assert plan["method"] == "lp" and plan["average_bits"] <= 2.5
    loaded = moecompress.load(tmp_path / "mc")
    ids = torch.randint(0, 8000, (1, 64))
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
