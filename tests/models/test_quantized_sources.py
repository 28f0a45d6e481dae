"""Sources stored quantized, as on the Hub: GPT-OSS in MXFP4, DeepSeek-V3 / Kimi-K2 in block-wise FP8. Both the
streamed and the in-memory loader dequantize them with transformers' own operations, to the same tensors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import FP4_VALUES

from moecompress.errors import ModelLoadError
from moecompress.models.loading import load_model
from moecompress.models.streaming import open_streamed, parameter_count

from .tiny_models import tiny_model


def mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, out, in] -> (blocks [E, out, in/32, 16] two e2m1 codes per byte, scales [E, out, in/32] E8M0)."""
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2**-126) / 6)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - torch.tensor(FP4_VALUES[:8])).abs().argmin(-1)
    code = magnitude + 8 * (scaled < 0)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8), (exponent + 127).to(torch.uint8)


def fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] -> (e4m3 weight [R, C], float32 scale_inv [ceil(R/b), ceil(C/b)]), as DeepSeek-V3 stores them."""
    rows, cols = w.shape
    padded = torch.nn.functional.pad(w.float(), (0, -cols % block, 0, -rows % block))
    blocks = padded.reshape(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def stored_quantized(model, folder: Path, quantize, quantization_config: dict) -> Path:
    """`model` saved, then its tensors for which `quantize(name, tensor)` gives replacements rewritten so."""
    model.save_pretrained(folder / "plain")
    state, out = load_file(folder / "plain" / "model.safetensors"), {}
    for name, tensor in state.items():
        out.update(quantize(name, tensor) or {name: tensor})
    dest = folder / "quantized"
    shutil.copytree(folder / "plain", dest)
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return dest


def gpt_oss_mxfp4(name: str, tensor: torch.Tensor) -> dict | None:
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stored [E, in, out], quantized along in
        blocks, scales = mxfp4(tensor.transpose(1, 2))
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}
    return None


def deepseek_fp8(name: str, tensor: torch.Tensor) -> dict | None:
    if ".layers." in name and name.endswith(".weight") and tensor.dim() == 2 and not name.endswith("mlp.gate.weight"):
        weight, scale = fp8_blocks(tensor, 16)
        return {name: weight, f"{name}_scale_inv": scale}
    return None


CASES = {
    "gpt_oss": (gpt_oss_mxfp4, {"quant_method": "mxfp4"}, 0.2),  # e2m1 with a power-of-two scale per 32
    "deepseek_v3": (
        deepseek_fp8,
        {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [16, 16]},
        0.05,
    ),
}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_quantized_sources_are_dequantized_alike_streamed_and_in_memory(model_type, tmp_path):
    """Every decoder tensor the streamed loader reads equals the in-memory load's, and the experts are the originals
    up to the storage format's rounding (which is there: the files hold no float expert)."""
    quantize, quantization_config, bound = CASES[model_type]
    model = tiny_model(model_type)
    source = stored_quantized(model, tmp_path, quantize, quantization_config)
    whole = load_model(str(source)).model
    streamed = open_streamed(str(source))
    streamed.prepare_layers("cpu")
    last = len(model.model.layers) - 1
    layer = streamed.load_layer(last, "cpu")
    for name, tensor in whole.model.layers[last].state_dict().items():
        assert torch.equal(layer.state_dict()[name], tensor), name
    stored = {t.data_ptr(): t.numel() for t in model.state_dict().values()}  # persistent buffers too, tied once
    assert parameter_count(str(source)) == sum(stored.values())  # scales not counted, MXFP4 bytes twice
    original = model.model.layers[last].mlp.experts.gate_up_proj.detach()
    dequantized = layer.mlp.experts.gate_up_proj.detach()
    error = float((dequantized - original).norm() / original.norm())
    assert 1e-3 < error < bound


def test_a_quantized_source_compresses_streamed_and_the_checkpoint_forgets_the_source_format(tmp_path, monkeypatch):
    import moecompress
    from moecompress.calibration.data import CalibrationBatch
    from moecompress.recipe import Recipe

    source = stored_quantized(tiny_model("gpt_oss"), tmp_path, gpt_oss_mxfp4, {"quant_method": "mxfp4"})
    ids = torch.randint(3, 120, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids).bool())
    monkeypatch.setattr("moecompress.pipeline.calibration_batches", lambda *args, **kwargs: [batch])
    recipe = Recipe.from_dict({"quantization": {"method": "rtn", "bits": 4, "group_size": 16}})
    result = moecompress.compress(str(source), recipe, tmp_path / "w4", progress=False)
    assert result.report.engine == "streamed"
    config = json.loads((tmp_path / "w4" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "moecompress"
    with torch.no_grad():
        reference = load_model(str(source)).model(input_ids=ids).logits
        ours = moecompress.load(tmp_path / "w4")(input_ids=ids).logits
    assert float((ours - reference).norm() / reference.norm()) < 0.5


def test_a_source_transformers_cannot_dequantize_is_refused_in_one_line(tmp_path):
    model = tiny_model("qwen3_moe")
    source = stored_quantized(model, tmp_path, lambda name, tensor: None, {"quant_method": "bitnet"})
    for opener in (open_streamed, load_model):
        with pytest.raises(ModelLoadError, match="bitnet, which transformers cannot dequantize") as info:
            opener(str(source))
        assert "\n" not in str(info.value)
