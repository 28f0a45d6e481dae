import pytest
import torch

import moecompress
from moecompress.calibration.data import CalibrationBatch
from moecompress.models import get_adapter, load_model
from moecompress.pipeline import calibration_batches
from moecompress.recipe import Recipe
from moecompress.slim import staged
from moecompress.slim.neurons import top_neurons
from moecompress.slim.staged import SlimConfig, cut_experts, neuron_scores, slim_experts

from ..conftest import CALIB, WIKI, require_shared
from ..models.tiny_models import tiny_model


def _lm_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b.inputs, labels=b.inputs["input_ids"]).loss) for b in batches) / len(batches)


def test_taylor_slimming_to_half_width_beats_cutting_random_neurons(tiny_text_path):
    require_shared(CALIB)
    require_shared(WIKI)
    loaded = load_model(str(tiny_text_path))
    calib = calibration_batches(
        loaded,
        Recipe.from_dict({"calibration": {"dataset": str(CALIB), "num_samples": 16, "seq_len": 256, "batch_size": 4}}),
    )
    held_out = calibration_batches(
        loaded,
        Recipe.from_dict({"calibration": {"dataset": str(WIKI), "num_samples": 8, "seq_len": 256, "batch_size": 4}}),
    )
    baseline = _lm_loss(loaded.model, held_out)
    scores = neuron_scores(loaded.model, loaded.adapter, calib)
    random_cut = load_model(str(tiny_text_path))
    g = torch.Generator().manual_seed(0)
    cut_experts(
        random_cut.model,
        random_cut.adapter,
        [torch.stack([torch.randperm(256, generator=g)[:128].sort().values for _ in range(16)]) for _ in scores],
    )
    cut_experts(loaded.model, loaded.adapter, [top_neurons(s, 128) for s in scores])
    assert loaded.model.config.moe_intermediate_size == 128
    taylor_loss, random_loss = _lm_loss(loaded.model, held_out), _lm_loss(random_cut.model, held_out)
    assert baseline < taylor_loss < random_loss - 0.1


def _tiny():
    model = tiny_model("qwen3_moe")
    g = torch.Generator().manual_seed(3)
    data = [
        CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        for ids in (torch.randint(0, model.config.vocab_size, (2, 24), generator=g) for _ in range(3))
    ]
    return model, get_adapter("qwen3_moe"), data


def test_an_interrupted_staged_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    config = SlimConfig(
        enabled=True, target=0.5, stages=2, multiple_of=4, steps_per_stage=3, lr=1e-3, checkpoint_every=1
    )
    teacher, adapter, data = _tiny()
    uninterrupted, _, _ = _tiny()
    report = slim_experts(uninterrupted, adapter, teacher, data, data, config, tmp_path / "a", "job", progress=False)
    assert [s.width for s in report.stages] == [24, 16] and uninterrupted.config.moe_intermediate_size == 16

    calls = []
    real = staged.distill

    def crash_in_second_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    interrupted, _, _ = _tiny()
    monkeypatch.setattr(staged, "distill", crash_in_second_stage)
    with pytest.raises(KeyboardInterrupt):
        slim_experts(interrupted, adapter, teacher, data, data, config, tmp_path / "b", "job", progress=False)
    monkeypatch.setattr(staged, "distill", real)
    resumed, _, _ = _tiny()
    report = slim_experts(resumed, adapter, teacher, data, data, config, tmp_path / "b", "job", progress=False)
    assert report.resumed_after_stage == 1
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(moecompress.errors.CheckpointError):
        slim_experts(_tiny()[0], adapter, teacher, data, data, config, tmp_path / "b", "other job", progress=False)


def test_a_slimmed_and_quantized_model_saves_and_loads_at_its_new_width(tiny_text_path, tmp_path):
    require_shared(CALIB)
    recipe = Recipe.from_dict(
        {
            "name": "slim-w4",
            "calibration": {"dataset": str(CALIB), "num_samples": 8, "seq_len": 128, "batch_size": 4},
            "slim": {"enabled": True, "target": 0.5, "stages": 1, "steps_per_stage": 0},
        }
    )
    result = moecompress.compress(str(tiny_text_path), recipe, output=tmp_path / "m", progress=False)
    assert result.report.slim["final_width"] == 128
    assert result.report.expert_params == 4 * 16 * 3 * 256 * 128
    model = moecompress.load(tmp_path / "m")
    assert model.config.moe_intermediate_size == 128
    ids = torch.randint(0, 8192, (1, 32))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, result.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
