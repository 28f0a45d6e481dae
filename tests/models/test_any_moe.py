"""The cheap columns of the architecture sweep for every MoE family of the installed transformers, found at test time:
engine vs forward <= 1e-5, the streamed RTN w4 checkpoint's experts equal to RTN in memory, its logits inside the
experts-zeroed scale, `from_pretrained == load`; or the one-line refusal this table expects. A family that transformers
adds is tested as soon as it is installed (and passes or fails here, not silently)."""

import pytest

from tests.models.sweep import FAST, moe_model_types, passes, run

# The families moecompress refuses, with what the refusal names; every other family must pass.
REFUSED = {
    "nemotron_h": "no gate projection",  # relu^2 experts: act(up) only
    "muse_spark": "a norm after each expert",
    "openai_privacy_filter": "not a Mixture-of-Experts that transformers builds",  # a token classifier only
    "diffusion_gemma": "experts in 2 stacks of layers",  # block diffusion: an encoder and a canvas decoder
    "dots3_note": "experts in 2 stacks of layers",  # MoE layers in its vision tower too
    "nemo_speechlm": "not a Mixture-of-Experts that transformers builds",  # a speech LM on Nemotron-H: no LM head class
}
# Families transformers itself cannot build from their config classes' defaults.
UNBUILDABLE = {"nemotron_h_omni": "'ParakeetEncoderConfig' object has no attribute 'projection_hidden_size'"}


@pytest.mark.parametrize("model_type", moe_model_types())
def test_family(model_type, tmp_path):
    row = run(model_type, tmp_path, FAST)
    if model_type in UNBUILDABLE and UNBUILDABLE[model_type] in row.get("refused", ""):
        pytest.skip(f"transformers cannot build {model_type} from its defaults: {UNBUILDABLE[model_type]}")
    if model_type in REFUSED:
        assert "refused" in row and REFUSED[model_type] in row["refused"], row
        return
    assert "refused" not in row, row["refused"]
    assert passes(row), row


def test_the_sweep_finds_the_families():
    found = moe_model_types()
    assert len(found) >= 64 and {"qwen3_moe", "gemma4", "deepseek_v4", "llama4", "kimi_k25"} <= set(found)
