import pytest
import torch

from moecompress.calibration.data import CalibrationBatch
from moecompress.calibration.engine import ExpertObserver, LayerInputs, Walk, collect_expert_stats
from moecompress.calibration.stats import GramSums
from moecompress.errors import RecipeError
from moecompress.formats import IntFormat
from moecompress.models import get_adapter
from moecompress.quant.gptq import quantize_gptq

from ..models.tiny_models import CONFIGS, tiny_model, walked_states


def batches(n=3, seq=24, vocab=128):
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, seq))
        out.append(CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids % 5 == 0))
    return out


SLIDING = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1, "num_hidden_layers": 3}
WALKED = [(t, {}) for t in CONFIGS] + [("qwen2_moe", SLIDING)]


@pytest.mark.parametrize("model_type, overrides", WALKED, ids=[t + ("-sliding" if o else "") for t, o in WALKED])
def test_layerwise_walk_reproduces_the_real_forward_at_every_layer(model_type, overrides):
    """Each decoder layer runs with its own arguments: Qwen2-MoE with (sliding, full, full) attention too, where
    reusing layer 0's sliding-window mask was off by 39% at layer 1."""
    model = tiny_model(model_type, **overrides)
    adapter = get_adapter(model_type)
    text = adapter.text_model(model)
    data = batches(n=2, seq=40)
    walked = walked_states(model, adapter, data)
    for b, batch in enumerate(data):
        with torch.no_grad():
            real = model(**batch.inputs, output_hidden_states=True).hidden_states
        for index in range(len(walked) - 1):  # the last entry of hidden_states is after the final norm
            reference = real[index + 1].double()
            error = float((walked[index][b].double() - reference).norm() / reference.norm())
            assert error < 1e-5, f"layer {index}: relative error {error:.2e}"
        with torch.no_grad():
            norm = getattr(text, "norm", None) or text.final_layernorm
            last = norm(walked[len(walked) - 1][b]).double()
        assert float((last - real[-1].double()).norm() / real[-1].double().norm()) < 1e-5


def image_batch(model, seed=0) -> CalibrationBatch:
    """Two sequences with one 4 x 4-patch image each (4 image tokens after the 2 x 2 merge) among text tokens, as
    the model's processor lays them out (Qwen/GLM: flattened patches, start/end tokens and multimodal rotary token
    types; Kimi: 3 x P x P patches; Llama 4: one 28 x 28 image of 16 patches, pixel-shuffled by 2; ERNIE-4.5-VL:
    flattened patches, and the tokens for the vision experts, its start/end markers included). The image mask is the
    adapter's."""
    gen = torch.Generator().manual_seed(seed)
    config = getattr(model.config, "thinker_config", model.config)  # Qwen3-Omni: the thinker's
    vision = config.vision_config
    start = getattr(config, "image_start_token_id", None) or getattr(config, "vision_start_token_id", None)
    end = getattr(config, "image_end_token_id", None) or getattr(config, "vision_end_token_id", None)
    image = [start] * (start is not None) + [config.image_token_id] * 4 + [end] * (end is not None)
    ids = torch.stack([torch.tensor(row) for row in ([5, 6] + image + [7, 8], [9] + image + [10, 11, 12])])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": torch.tensor([[1, 4, 4]] * 2)}
    if hasattr(vision, "pixel_shuffle_ratio"):
        del inputs["image_grid_thw"]
        inputs["pixel_values"] = torch.randn(2, 3, vision.image_size, vision.image_size, generator=gen)
    elif hasattr(vision, "temporal_merge_size"):
        inputs["pixel_values"] = torch.randn(2 * 16, 3 * vision.patch_size**2, generator=gen)
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).long()
        inputs["moe_mm_token_type_ids"] = get_adapter(model.config.model_type).image_token_mask(model, ids).long()
    elif hasattr(vision, "temporal_patch_size"):
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        inputs |= {"pixel_values": torch.randn(2 * 16, patch, generator=gen)}
        inputs |= {"mm_token_type_ids": (ids == config.image_token_id).long()}
    else:
        inputs["pixel_values"] = torch.randn(2 * 16, 3, vision.patch_size, vision.patch_size, generator=gen)
    return CalibrationBatch(inputs, get_adapter(model.config.model_type).image_token_mask(model, ids))


@pytest.mark.parametrize(
    "model_type",
    ["glm4v_moe", "qwen3_5_moe", "qwen3_vl_moe", "kimi_k25", "llama4", "ernie4_5_vl_moe", "qwen3_omni_moe"],
)
def test_vision_language_walk_sees_the_images(model_type):
    """With pixels in the batch, the layer-wise walk reproduces the model's own forward (vision features merged at the
    image positions, multimodal rotary positions, Qwen3-VL's DeepStack features added after the first layers) and
    every MoE layer counts each image token, top-k times, as image; where a layer has a text and a vision expert set
    (ERNIE-4.5-VL), the vision set counts every image token and the text set every other one."""
    model = tiny_model(model_type)
    adapter = get_adapter(model_type)
    batch = image_batch(model)
    walked = walked_states(model, adapter, [batch])
    text_only = {k: v for k, v in batch.inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        real = model(**batch.inputs, output_hidden_states=True).hidden_states
        blind = model(**text_only, output_hidden_states=True).hidden_states
        last = adapter.text_model(model).norm(walked[len(walked) - 1][0])
    vision = getattr(model.config, "thinker_config", model.config).vision_config
    deepstack = len(getattr(vision, "deepstack_visual_indexes", []))
    for index in range(deepstack, len(walked) - 1):  # transformers records a layer's output before DeepStack adds to it
        reference = real[index + 1].double()
        assert float((walked[index][0].double() - reference).norm() / reference.norm()) < 1e-5
    assert float((last.double() - real[-1].double()).norm() / real[-1].double().norm()) < 1e-5  # after the final norm
    assert float((blind[1] - real[1]).norm() / real[1].norm()) > 1e-2  # the images do change the states
    stats = collect_expert_stats(model, adapter, [batch], "tiny", measure_drop_loss=False, walk=Walk(progress=False))
    images, views = int(batch.image_mask.sum()), adapter.moe_blocks(model)
    assert images == 8 + 4 * (model_type == "ernie4_5_vl_moe")  # ERNIE's vision experts take the markers too
    for row, view in enumerate(views):
        sees = {"text": view.group != "image", "image": view.group != "text"}
        assert stats.tokens[row, :, 1].sum() == images * view.top_k * sees["image"]
        assert stats.tokens[row, :, 0].sum() == (batch.image_mask.numel() - images) * view.top_k * sees["text"]


def test_observer_counts_and_hessians_match_the_routing():
    model = tiny_model("qwen3_moe")
    view = get_adapter("qwen3_moe").moe_blocks(model)[0]
    x = torch.randn(300, 64)
    image = torch.rand(300) < 0.3
    observer = ExpertObserver(view, total_tokens=300)
    observer.observe(x, image)
    weights, indices = view.route(x)
    assert observer.tokens.sum() == 300 * 2
    assert observer.total_tokens.tolist() == [float((~image).sum()), float(image.sum()), 0.0]  # no audio
    for e in range(8):
        tok = (indices == e).any(1)
        assert observer.tokens[e, 1] == (tok & image).sum()
        if tok.any():
            torch.testing.assert_close(observer.hessian_in.full(e), x[tok].T @ x[tok], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(
                observer.weight_sum[e].sum().float(), weights[indices == e].sum(), rtol=1e-5, atol=1e-5
            )


def test_observer_weighs_tokens_in_its_grams_and_weighted_counts():
    """Token weights w enter the Grams as sum w x x^T (float64 reference) and the weighted counts as sum w and
    sum w x routing weight; weights of 1 give the unweighted sums exactly."""
    model = tiny_model("qwen3_moe")
    view = get_adapter("qwen3_moe").moe_blocks(model)[0]
    x, image = torch.randn(300, 64), torch.rand(300) < 0.3
    w = torch.rand(300) * 3 + 0.1
    weighted, plain = ExpertObserver(view, total_tokens=300), ExpertObserver(view, total_tokens=300)
    weighted.observe(x, image, w)
    plain.observe(x, image, torch.ones(300))
    reference = ExpertObserver(view, total_tokens=300)
    reference.observe(x, image)
    with torch.no_grad():
        routing, indices = view.route(x)
    assert weighted.weighted_total == pytest.approx(float(w.sum()), rel=1e-6)
    for e in range(8):
        tok, slot = torch.where(indices == e)
        if tok.numel() == 0:
            continue
        xd, wd = x[tok].double(), w[tok].double()
        expected = (xd * wd[:, None]).T @ xd
        got = weighted.hessian_in.full(e).double()
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        assert torch.equal(plain.hessian_in.full(e), reference.hessian_in.full(e))
        assert float(weighted.weighted[e, 0]) == pytest.approx(float(wd.sum()), rel=1e-6)
        assert float(weighted.weighted[e, 1]) == pytest.approx(
            float((wd * routing[tok, slot].double()).sum()), rel=1e-5
        )


def test_token_weights_count_every_source_the_same_and_split_its_modalities():
    """Three long text batches and two short image+text ones: each source carries half the total weight, within
    the image+text source the modalities split as `modality_weights` say, and the mean weight is 1."""
    text = [torch.zeros(2, 50, dtype=torch.long) for _ in range(3)]
    vl = [torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0]]), torch.tensor([[0, 1, 1, 1, 0, 0]])]
    inputs = LayerInputs(modalities=text + vl, sources=["dataset"] * 3 + ["vl_dataset"] * 2)
    weights = inputs.token_weights({"text": 1.0, "image": 3.0})
    n = inputs.num_tokens
    assert sum(float(w.sum()) for w in weights) == pytest.approx(n)
    assert sum(float(w.sum()) for w in weights[:3]) == pytest.approx(n / 2)
    image = sum(float(w[m == 1].sum()) for w, m in zip(weights[3:], vl))
    assert image == pytest.approx(n / 2 * 3 / 4)
    assert all(torch.allclose(w, w.flatten()[0]) for w in weights[:3])  # one text token weighs like another
    only_text = LayerInputs(modalities=text, sources=["dataset"] * 3)
    assert all(torch.equal(w, torch.ones_like(w, dtype=torch.float32)) for w in only_text.token_weights({"text": 1}))
    with pytest.raises(RecipeError, match="unknown modalities"):
        inputs.token_weights({"video": 1.0})
    with pytest.raises(RecipeError, match="zero weight"):
        only_text.token_weights({"image": 1.0})


def test_expert_stats_round_trip_and_drop_loss(tmp_path):
    model = tiny_model("qwen2_moe")
    adapter = get_adapter("qwen2_moe")
    stats = collect_expert_stats(model, adapter, batches(), "tiny-qwen2-moe", walk=Walk(progress=False))
    assert stats.tokens.shape == (2, 8, 3)  # text, image, audio
    assert torch.allclose(stats.frequency.sum(1)[:, 0], torch.full((2,), 2.0, dtype=torch.float64))
    routed = stats.tokens.sum(-1) > 0
    assert (stats.drop_loss[routed].sum(-1) > 0).all()
    stats.save(tmp_path)
    from moecompress.calibration.stats import ExpertStats

    again = ExpertStats.load(tmp_path)
    assert torch.equal(again.tokens, stats.tokens) and again.layers == stats.layers


@torch.no_grad()
def test_error_profile_is_the_block_output_error_of_rtn():
    from moecompress.models.base import ExpertWeights
    from moecompress.quant.rtn import quantize_rtn

    view = get_adapter("qwen3_moe").moe_blocks(tiny_model("qwen3_moe"))[0]
    fmt = IntFormat(2, 16)
    from moecompress.allocation.profile import ErrorProfile

    profile = ErrorProfile(view, [fmt])
    observer = ExpertObserver(view, total_tokens=200, statistics=(), collectors=lambda v: [profile])
    x = torch.randn(200, 64)
    observer.observe(x, torch.zeros(200, dtype=torch.bool))
    weights, indices = view.route(x)
    e = int(indices[0, 0])
    tok, slot = torch.where(indices == e)
    w = weights[tok, slot, None]
    original = view.expert_weights(e)
    quantized = ExpertWeights(
        *(quantize_rtn(original[p], fmt).dequantize() for p in ("gate_proj", "up_proj", "down_proj"))
    )
    y = view.expert_forward(e, x[tok])[1]
    for v, replaced in enumerate(
        [
            original.replace(gate_proj=quantized.gate_proj),
            original.replace(up_proj=quantized.up_proj),
            original.replace(down_proj=quantized.down_proj),
            quantized,
        ]
    ):
        expected = (w * (view.expert_forward(e, x[tok], replaced)[1] - y)).pow(2).sum()
        assert float(profile.quant_error[e, 0, v]) == pytest.approx(float(expected), rel=1e-4)
        assert expected > 0


def test_gram_sums_hold_half_and_give_back_the_full_sums_gptq_needs():
    gen = torch.Generator().manual_seed(3)
    sums, reference = GramSums(), {}
    for _ in range(3):
        for e, n in ((0, 48), (5, 17)):
            x = torch.randn(n, 32, generator=gen)
            sums.add(e, x)
            reference[e] = reference.get(e, 0) + x.double().T @ x.double()
    assert sums._lower[0].numel() == 32 * 33 // 2
    full = sums.full(0)
    assert torch.equal(full, full.T)
    for e in (0, 5):
        err = (sums.full(e).double() - reference[e]).norm() / reference[e].norm()
        assert err < 1e-6
    w = torch.randn(24, 32, generator=gen)
    gram = torch.randn(200, 32, generator=gen)
    gram = gram.T @ gram  # not exactly symmetric in float32: GPTQ reads its lower triangle only
    single = GramSums()
    single._lower[0] = gram.view(-1)[single._flat(32, gram.device)[0]].clone()
    fmt = IntFormat(bits=4, group_size=16, sym=False)
    assert torch.equal(quantize_gptq(w, single.pop(0), fmt).codes, quantize_gptq(w, gram, fmt).codes)
    assert sums.pop(0) is not None and sums.full(0) is None and sums.pop(0) is None


def test_audio_tokens_are_a_third_modality():
    """Qwen3-Omni with 100 frames of log-mel features per sequence (13 audio tokens after the audio tower): the walk
    reproduces the thinker's forward below 1e-5, the audio changes the states, and every MoE layer counts each
    audio token top-k times under "audio" (none under "image")."""
    model, adapter = tiny_model("qwen3_omni_moe"), get_adapter("qwen3_omni_moe")
    config = model.config.thinker_config
    audio = [config.audio_start_token_id] + [config.audio_token_id] * 13
    ids = torch.stack([torch.tensor(row) for row in ([5, 6] + audio + [7, 8], [9] + audio + [10, 11, 12])])
    features = torch.randn(2, 128, 100, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch = CalibrationBatch(
        {**inputs, "input_features": features, "feature_attention_mask": torch.ones(2, 100, dtype=torch.long)},
        adapter.image_token_mask(model, ids),
    )
    walked = walked_states(model, adapter, [batch])
    with torch.no_grad():
        real = model(**batch.inputs, output_hidden_states=True).hidden_states
        deaf = model(**inputs, output_hidden_states=True).hidden_states
    for index in range(len(walked) - 1):
        reference = real[index + 1].double()
        assert float((walked[index][0].double() - reference).norm() / reference.norm()) < 1e-5
    assert float((deaf[1] - real[1]).norm() / real[1].norm()) > 1e-2
    stats = collect_expert_stats(model, adapter, [batch], "tiny", measure_drop_loss=False, walk=Walk(progress=False))
    assert stats.modalities == ("text", "image", "audio")
    top_k = adapter.moe_blocks(model)[0].top_k
    assert stats.tokens[:, :, 2].sum(1).tolist() == [26 * top_k] * stats.tokens.shape[0]
    assert (
        stats.tokens[:, :, 1].sum() == 0 and stats.tokens[:, :, 0].sum(1).tolist() == [(ids.numel() - 26) * top_k] * 2
    )


def test_a_vl_dataset_given_for_a_text_model_is_named_as_unused(tiny_text_path, caplog):
    from moecompress.calibration.batches import calibration_batches
    from moecompress.models import load_model
    from moecompress.recipe import Recipe

    from ..conftest import CALIB, require_shared

    require_shared(CALIB)
    loaded = load_model(str(tiny_text_path))
    calibration = {"dataset": str(CALIB), "num_samples": 2, "seq_len": 16, "vl_dataset": "images.jsonl"}
    with caplog.at_level("WARNING", logger="moecompress.calibration.batches"):
        batches = calibration_batches(loaded, Recipe.from_dict({"calibration": calibration}).calibration)
    assert len(batches) == 1 and batches[0].inputs["input_ids"].shape == (2, 16)
    assert "calibration.vl_dataset is not used" in caplog.text and "text-only" in caplog.text
