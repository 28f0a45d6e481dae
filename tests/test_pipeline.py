import json
from pathlib import Path

import pytest
import torch

import moecompress
from moecompress.recipe import CalibrationConfig, Recipe
from moecompress.runtime import PackedLinear

from .conftest import CALIB, require_shared


def test_lp_mixed_precision_compresses_saves_and_reloads(tiny_text_path, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 8, "seq_len": 256},
            "allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4], "profile_tokens": 512},
        }
    )
    result = moecompress.compress(str(tiny_text_path), recipe, output=tmp_path / "mc", progress=False, stream=False)
    bits = {m.fmt.bits for m in result.model.modules() if isinstance(m, PackedLinear)}
    assert len(bits) > 1
    assert result.report.code_bits_per_expert_param <= 2.5
    plan = json.loads((tmp_path / "mc" / "plan.json").read_text())
    assert plan["method"] == "lp" and plan["average_bits"] <= 2.5
    loaded = moecompress.load(tmp_path / "mc")
    ids = torch.randint(0, 8000, (1, 64))
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_ternary_with_recovery_saves_exactly_what_it_trained(tiny_text_path, tmp_path):
    recipe = Recipe.from_yaml(Path(__file__).resolve().parent.parent / "pipelines" / "ternary-experts.yaml")
    recipe.calibration = CalibrationConfig(dataset=str(require_shared(CALIB)), num_samples=4, seq_len=128)
    recipe.quantization.method = "rtn"
    recipe.recovery.steps, recipe.recovery.num_samples, recipe.recovery.seq_len = 3, 6, 64
    result = moecompress.compress(str(tiny_text_path), recipe, output=tmp_path / "t", progress=False)
    linears = [m for m in result.model.modules() if isinstance(m, PackedLinear)]
    assert all(m.fmt.family == "ternary-base3" and m.method == "qat" for m in linears)
    # the training state only outlives an interrupted job
    assert result.report.recovery["steps"] == 3 and not (tmp_path / "t.recovery-state").exists()
    assert 1.6 < result.report.bits_per_expert_param < 1.7  # 5 trits/byte + one fp16 scale per row of 256
    manifest = json.loads((tmp_path / "t" / "moecompress.json").read_text())
    assert all(t["ternary"] for t in manifest["tensors"].values())
    loaded = moecompress.load(tmp_path / "t")
    ids = torch.randint(0, 8000, (1, 64))
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_compress_runs_the_enabled_stages_in_order_with_one_context(tiny_text_path, monkeypatch):
    from moecompress import stages

    seen = []

    class Probe(stages.Stage):
        name = "probe"

        def enabled(self, recipe):
            return True

        def run(self, ctx):
            # after quantization: the context carries the plan, the packed model and one report per expert
            seen.append((ctx.plan.formats[0].bits, len(ctx.quant_reports), ctx.recipe.name))
            return {"packed_linears": sum(isinstance(m, PackedLinear) for m in ctx.loaded.model.modules())}

    after = [s.name for s in stages.STAGES].index("quantize") + 1
    monkeypatch.setattr("moecompress.pipeline.STAGES", (*stages.STAGES[:after], Probe(), *stages.STAGES[after:]))
    recipe = Recipe.from_dict(
        {
            "name": "probe-w3",
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 2, "seq_len": 64},
            "quantization": {"method": "rtn", "bits": 3},
        }
    )
    result = moecompress.compress(str(tiny_text_path), recipe, progress=False)
    assert seen == [(3, 4 * 16, "probe-w3")]
    assert list(result.report.stage_seconds) == ["allocation", "quantize", "probe"]  # the others are off
    names = [s.name for s in stages.STAGES]
    # gguf: the export's section, enabled for no run
    assert names == [
        "merge",
        "slim",
        "factor",
        "allocation",
        "quantize",
        "routing",
        "recovery",
        "dense",
        "skip",
        "gguf",
    ]


def _recovery_recipe() -> Recipe:
    recipe = Recipe.from_yaml(Path(__file__).resolve().parent.parent / "pipelines" / "ternary-experts.yaml")
    recipe.calibration = CalibrationConfig(dataset=str(require_shared(CALIB)), num_samples=4, seq_len=128)
    recipe.quantization.method = "rtn"
    recipe.recovery.steps, recipe.recovery.num_samples, recipe.recovery.seq_len = 2, 4, 64
    return recipe


def test_a_teacher_that_does_not_fit_is_offloaded_to_disk_and_teaches_the_same(tiny_text_path, tmp_path, monkeypatch):
    """The recovery teacher is bfloat16; where memory is short accelerate keeps part of it on disk, and the student
    learns exactly what it learns from a teacher held whole."""
    from moecompress.models import LoadedModel
    from moecompress.stages import recovery, teacher
    from moecompress.training import memory

    teachers = []

    def recording(ctx, stage, source=None):
        teachers.append(teacher.distill_teacher(ctx, stage, source).model)
        return LoadedModel(teachers[-1], ctx.loaded.adapter, ctx.loaded.source)

    monkeypatch.setattr(recovery, "distill_teacher", recording)
    moecompress.compress(str(tiny_text_path), _recovery_recipe(), output=tmp_path / "whole", progress=False)
    placement = memory.teacher_placement

    def short_of_memory(teacher_bytes, reserve, folder, device="cpu"):  # room for two thirds of the teacher
        return placement(
            teacher_bytes, (memory.available_bytes() - 2 * teacher_bytes // 3) / memory.HEADROOM, folder, device
        )

    monkeypatch.setattr(teacher, "teacher_placement", short_of_memory)
    moecompress.compress(str(tiny_text_path), _recovery_recipe(), output=tmp_path / "offloaded", progress=False)
    whole, offloaded = teachers
    assert {p.dtype for p in whole.parameters()} == {torch.bfloat16} and not getattr(whole, "hf_device_map", None)
    assert "disk" in set(offloaded.hf_device_map.values()) and "cpu" in set(offloaded.hf_device_map.values())
    assert not (tmp_path / "offloaded.recovery-state").exists()
    from .test_streaming import tensor_hashes

    assert tensor_hashes(tmp_path / "offloaded") == tensor_hashes(tmp_path / "whole")


def test_training_stages_state_their_memory_and_refuse_before_loading_what_cannot_fit(
    tiny_text_path, tmp_path, monkeypatch, caplog
):
    from moecompress.errors import InsufficientMemoryError
    from moecompress.training import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 10**6)
    monkeypatch.setattr(moecompress.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(InsufficientMemoryError, match=r"need 0\.\d GB for the float32 model .* 0\.0 GB is available"):
        moecompress.compress(str(tiny_text_path), _recovery_recipe(), output=tmp_path / "o", progress=False)
    assert "bfloat16 teacher" in caplog.text and not (tmp_path / "o").exists()
