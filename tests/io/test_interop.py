import json

import pytest
import torch

import moecompress
from moecompress.errors import CheckpointError
from moecompress.formats import IntFormat, pack, ternary_format
from moecompress.io.interop import (
    checkpoint_projection_names,
    export_interop,
    to_compressed_tensors,
    to_gptq_v1,
    uniform_format,
)
from moecompress.quant.rtn import quantize_rtn

from ..conftest import CALIB, require_shared


def _packed(bits: int, sym: bool, group: int, shape=(64, 256)):
    weight = torch.randn(*shape)
    qt = quantize_rtn(weight, IntFormat(bits, group, sym))
    return pack(qt), qt.dequantize(torch.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [64, -1])
def test_compressed_tensors_decompressor_reads_the_export_exactly(bits, sym, group):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    packed, dense = _packed(bits, sym, group)
    tensors = to_compressed_tensors(
        packed.tensors["weight_packed"],
        packed.tensors["weight_scale"],
        packed.tensors["weight_zero_point"],
        packed.shape,
        packed.fmt,
    )
    assert ("weight_zero_point" in tensors) == (not sym)
    args = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=sym,
        strategy="channel" if group == -1 else "group",
        group_size=None if group == -1 else group,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    weight = compressor.decompress(dict(tensors), scheme)["weight"]
    # compressed-tensors dequantizes in the fp16 scale dtype: the exact product, rounded once to fp16.
    assert weight.dtype == torch.float16 and torch.equal(weight, dense.half())


def _gptq_v1_reference_dequant(t: dict, bits: int) -> torch.Tensor:
    """GPTQ v1 decoding as AutoGPTQ's torch kernel does it (for widths dividing 32): shifts along the packed rows,
    stored zeros + 1."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = 2**bits - 1
    codes = (t["qweight"].unsqueeze(1) >> shifts[None, :, None]) & mask  # [in/pw, pw, out]
    codes = codes.reshape(-1, t["qweight"].shape[1])  # [in, out]
    zeros = (t["qzeros"].unsqueeze(2) >> shifts[None, None, :]) & mask  # [groups, out/pw, pw]
    zeros = zeros.reshape(t["qzeros"].shape[0], -1) + 1  # [groups, out]
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (codes - zeros[g]).float()).T


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_v1_export_decodes_like_autogptq(bits, sym):
    packed, dense = _packed(bits, sym, 128)
    if int(packed.tensors["weight_zero_point"].min()) == 0:
        pytest.skip("zero point 0 is not representable in GPTQ v1 (tested separately)")
    tensors = to_gptq_v1(
        packed.tensors["weight_packed"],
        packed.tensors["weight_scale"],
        packed.tensors["weight_zero_point"],
        packed.shape,
        packed.fmt,
    )
    assert tensors["qweight"].shape == (256 * bits // 32, 64) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (2, 64 * bits // 32) and tensors["scales"].shape == (2, 64)
    assert torch.equal(_gptq_v1_reference_dequant(tensors, bits), dense)
    if sym:  # v1 stores the symmetric zero 2^(bits-1) as 2^(bits-1) - 1
        stored = (tensors["qzeros"][0, 0] & (2**bits - 1)).item()
        assert stored == 2 ** (bits - 1) - 1


def test_gptq_v1_refuses_a_zero_point_of_zero():
    packed, _ = _packed(4, False, 128)
    zeros = packed.tensors["weight_zero_point"].clone()
    zeros[0, 0] = 0
    with pytest.raises(CheckpointError, match="zero point of 0"):
        to_gptq_v1(packed.tensors["weight_packed"], packed.tensors["weight_scale"], zeros, packed.shape, packed.fmt)


def test_only_uniform_integer_checkpoints_export():
    w4, w2 = IntFormat(4, 128).to_dict(), IntFormat(2, 128).to_dict()
    config = {"quantization_config": {"formats": [w4, w2], "experts": {"m": [[0, 0, 0], [1, 1, 1]]}}}
    with pytest.raises(CheckpointError, match="2 formats"):
        uniform_format(config)
    config["quantization_config"]["experts"] = {"m": [[0, 0, 0], [0, 0, 0]]}
    assert uniform_format(config) == IntFormat(4, 128)
    ternary = {"quantization_config": {"formats": [ternary_format().to_dict()], "experts": {"m": [[0, 0, 0]]}}}
    with pytest.raises(CheckpointError, match="ternary"):
        uniform_format(ternary)
    with pytest.raises(CheckpointError, match="dynamic expert skipping"):
        uniform_format({"quantization_config": {**config["quantization_config"], "dynamic_skip": {"method": "odp"}}})
    factored = {"base": [0, 0, 0], "deltas": [[[8, 0, 0], [0, None, None], [8, 0, 0]]]}
    with pytest.raises(CheckpointError, match="factored experts"):
        uniform_format({"quantization_config": {**config["quantization_config"], "factored": {"m": factored}}})


def test_expert_names_follow_the_original_checkpoints():
    assert checkpoint_projection_names("qwen3_moe") == {
        "gate_proj": "gate_proj",
        "up_proj": "up_proj",
        "down_proj": "down_proj",
    }
    assert checkpoint_projection_names("mixtral") == {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    with pytest.raises(CheckpointError, match="stores qwen3_vl_moe experts fused"):
        checkpoint_projection_names("qwen3_vl_moe")


@pytest.fixture(scope="module")
def symmetric_tiny_text(tmp_path_factory, tiny_text_path):
    from moecompress.recipe import Recipe

    recipe = Recipe.from_dict(
        {
            "name": "test-w4-sym",
            "quantization": {"sym": True},
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 16, "seq_len": 256},
        }
    )
    out = tmp_path_factory.mktemp("sym") / "tiny-w4-sym"
    moecompress.compress(str(tiny_text_path), recipe, output=out, progress=False)
    return out


def test_transformers_with_compressed_tensors_reproduces_moecompress_logits(symmetric_tiny_text, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from moecompress.runtime import native

    monkeypatch.setattr(native, "INT8_TOKENS", 0)  # the stored format's arithmetic, not int8 activation rounding
    exported = export_interop(symmetric_tiny_text, tmp_path / "ct", "compressed-tensors")
    config = json.loads((exported / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    ids = torch.randint(0, 8000, (2, 64))
    independent = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    ours = moecompress.load(symmetric_tiny_text)
    with torch.no_grad():
        a, b = independent(input_ids=ids).logits, ours(input_ids=ids).logits
    # Only the fp16 rounding of dequantized weights differs (compressed-tensors dequantizes in the scale dtype); that
    # rounding may flip a router's near-tie at one position of 128 (on an AVX2 CPU: 0.088 there, 3.4e-3 at the next,
    # median 1.7e-4), which moves the later positions of that sequence a little
    errors = ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten()
    assert int((errors > 1e-2).sum()) <= 1 and float(errors.quantile(0.95)) < 2e-3 and float(errors.median()) < 5e-4


def test_gptq_export_layout_and_config(symmetric_tiny_text, tmp_path):
    from safetensors import safe_open

    exported = export_interop(symmetric_tiny_text, tmp_path / "gptq", "gptq")
    quantize_config = json.loads((exported / "quantize_config.json").read_text())
    assert quantize_config | {"dynamic": None} == {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": 4,
        "group_size": 128,
        "sym": True,
        "desc_act": False,
        "true_sequential": True,
        "dynamic": None,
    }
    model = moecompress.load(symmetric_tiny_text)
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        prefix = "model.layers.1.mlp.experts.5.down_proj."
        tensors = {name: f.get_tensor(prefix + name) for name in ("qweight", "qzeros", "scales", "g_idx")}
    assert not any("weight_packed" in k for k in keys) and "model.layers.1.self_attn.q_proj.weight" in keys
    expected = model.model.layers[1].mlp.experts[5].down_proj.dequantize(torch.float32)
    assert torch.equal(_gptq_v1_reference_dequant(tensors, 4), expected)


def test_mixed_precision_export_is_refused_before_writing(compressed_tiny_text, tmp_path):
    _, out = compressed_tiny_text
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    qc["formats"].append(IntFormat(2, 128).to_dict())
    first = next(iter(qc["experts"]))
    qc["experts"][first][0] = [1, 1, 1]
    with pytest.raises(CheckpointError, match="--format moecompress"):
        uniform_format(config)
    # The same edit made to a checkpoint's config.json is tampering: refused before anything is written.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in out.iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
    (mixed / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quantization_config was changed"):
        export_interop(mixed, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_an_export_whose_groups_do_not_divide_a_projection_is_refused_at_export_time(tmp_path, monkeypatch):
    """Mixtral with expert width 96 at group 64: transformers raises when loading such a compressed-tensors or
    GPTQ export, so the export itself says so (and writes nothing)."""
    import moecompress
    from moecompress.calibration.data import CalibrationBatch
    from moecompress.recipe import Recipe

    from ..models.tiny_models import tiny_model

    tiny_model("mixtral").save_pretrained(tmp_path / "src")
    ids = torch.randint(3, 128, (2, 32))
    batch = CalibrationBatch(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids, dtype=torch.bool)
    )
    monkeypatch.setattr("moecompress.pipeline.calibration_batches", lambda *args, **kwargs: [batch])
    recipe = Recipe.from_dict({"quantization": {"method": "rtn", "bits": 4, "group_size": 64, "sym": True}})
    moecompress.compress(str(tmp_path / "src"), recipe, tmp_path / "w4", progress=False)
    for target in ("compressed-tensors", "gptq"):
        with pytest.raises(CheckpointError, match=r"down_proj has 96 inputs, not a multiple of group size 64"):
            export_interop(tmp_path / "w4", tmp_path / target, target)
        assert not (tmp_path / target).exists()


def test_an_asymmetric_compressed_tensors_export_warns_that_transformers_cannot_load_it(
    compressed_tiny_text, tmp_path, caplog
):
    _, out = compressed_tiny_text
    export_interop(out, tmp_path / "ct", "compressed-tensors")
    assert "transformers (<= 5.23) cannot load asymmetric MoE experts" in caplog.text
