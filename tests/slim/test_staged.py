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
from ..models.tiny_models import routed_by_hand, tiny_model


def _lm_loss(model, batches) -> float:
    with torch.no_grad():
        return sum(float(model(**b.inputs, labels=b.inputs["input_ids"]).loss) for b in batches) / len(batches)


def test_taylor_slimming_to_half_width_beats_cutting_random_neurons(tiny_text_path):
    require_shared(CALIB)
    require_shared(WIKI)
    loaded = load_model(str(tiny_text_path))
    calib = calibration_batches(
        loaded,
        Recipe.from_dict(
            {"calibration": {"dataset": str(CALIB), "num_samples": 16, "seq_len": 256, "batch_size": 4}}
        ).calibration,
    )
    held_out = calibration_batches(
        loaded,
        Recipe.from_dict(
            {"calibration": {"dataset": str(WIKI), "num_samples": 8, "seq_len": 256, "batch_size": 4}}
        ).calibration,
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


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_cutting_neurons_equals_masking_them_in_every_expert_layout(model_type):
    """Through the view, for the default fused layout, GPT-OSS's (transposed, interleaved, biases, clamped
    SwiGLU) and Llama 4's (transposed, input-scaled routing): the cut experts compute what the full ones do with the other neurons' activations zeroed, and the
    model's own fused forward agrees with the view afterwards."""
    import torch.nn.functional as F

    model, adapter = tiny_model(model_type), get_adapter(model_type)
    views = adapter.moe_blocks(model)
    width = views[0].intermediate_size
    keep = [top_neurons(torch.rand(v.num_experts, width), width // 2) for v in views]
    x = torch.randn(9, 64)
    expected = []
    with torch.no_grad():
        for view, k in zip(views, keep):
            for e in range(view.num_experts):
                w, mask = view.expert_weights(e), torch.zeros(width)
                mask[k[e]] = 1
                h = view.activation(F.linear(x, w.gate_proj, w.gate_bias), F.linear(x, w.up_proj, w.up_bias))
                expected.append(F.linear(h * mask, w.down_proj, w.down_bias))
        cut_experts(model, adapter, keep)
        views = adapter.moe_blocks(model)
        got = [view.expert_forward(e, x)[1] for view in views for e in range(view.num_experts)]
        view = views[0]
        weights, indices = view.route(x)
        manual = routed_by_hand(view, x, indices, weights)
        fused = view.routed_forward(x, indices, weights)
    assert views[0].intermediate_size == width // 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, manual, rtol=1e-5, atol=1e-5)


def test_neuron_scores_read_transposed_down_projections():
    """GPT-OSS stores down_proj [E, I, H]: the scores are still one per (expert, neuron), and the same as for
    the weights written in the default layout."""
    model, adapter = tiny_model("gpt_oss"), get_adapter("gpt_oss")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids).bool())
    scores = neuron_scores(model, adapter, [batch])
    view = adapter.moe_blocks(model)[0]
    assert scores[0].shape == (view.num_experts, view.intermediate_size)
    down, transposed = adapter.down_projections(view.experts)
    assert transposed and down.shape[1] == view.intermediate_size
    assert bool((scores[0] > 0).all()) and bool(torch.isfinite(scores[0]).all())
