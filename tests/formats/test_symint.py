"""The symint format (formats/symint.py): IntFormat's symmetric codes and scales without stored zero points."""

import pytest
import torch

import moecompress
from moecompress.formats import FORMATS, IntFormat, QuantFormat, pack, unpack
from moecompress.quant.gptq import quantize_gptq
from moecompress.recipe import Recipe
from moecompress.runtime import native
from moecompress.runtime.packed_experts import PackedLinear

from ..conftest import CALIB, require_shared

SymInt = FORMATS["symint"]


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (8, -1)])
def test_symint_stores_intformats_codes_and_scales_without_zero_points(bits, group):
    w, x = torch.randn(48, 256), torch.randn(512, 256)
    h = x.T @ x
    plain, nozero = quantize_gptq(w, h, IntFormat(bits, group, True)), quantize_gptq(w, h, SymInt(bits, group, True))
    assert torch.equal(plain.dequantize(), nozero.dequantize())
    packed = pack(nozero)
    assert set(packed.tensors) == {"weight_packed", "weight_scale"}
    assert packed.nbytes == pack(plain).nbytes - packed.tensors["weight_scale"].numel()  # one uint8 zero per group
    assert torch.equal(unpack(packed).dequantize(), plain.dequantize())
    assert QuantFormat.from_dict(nozero.fmt.to_dict()) == nozero.fmt != plain.fmt
    with pytest.raises(ValueError, match="sym=True"):
        SymInt(bits, group, False)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_native_kernels_take_the_implied_zero_point(bits):
    fmt = SymInt(bits, 64, True)
    w = torch.randn(40, 320)
    linear = PackedLinear(40, 320, fmt)
    linear.load_packed(pack(quantize_gptq(w, torch.eye(320), fmt)))
    x = torch.randn(3, 320)
    reference = x.double() @ linear.dequantize(torch.float64).T
    y = native.packed_linear(linear, x).double()
    assert float((y - reference).norm() / reference.norm()) < 1e-5


def test_a_symint_recipe_compresses_saves_and_reloads(tiny_text_path, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 4, "seq_len": 128},
            "quantization": {"packed_format": "symint", "sym": True},
        }
    )
    result = moecompress.compress(str(tiny_text_path), recipe, output=tmp_path / "s", progress=False, stream=False)
    assert 4.12 < result.report.bits_per_expert_param < 4.13  # 4 + 16 / 128
    loaded = moecompress.load(tmp_path / "s")
    assert all(m.fmt.family == "symint" for m in loaded.modules() if isinstance(m, PackedLinear))
    ids = torch.randint(0, 8000, (1, 32))
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    with pytest.raises(moecompress.MoECompressError, match="sym=True"):
        Recipe.from_dict({"quantization": {"packed_format": "symint"}})
