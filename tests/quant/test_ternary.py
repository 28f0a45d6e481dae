import pytest
import torch

from moecompress.formats import IntFormat, QuantFormat, pack, ternary_format, ternary_scales, unpack
from moecompress.formats.bitpack import pack_trits, unpack_trits
from moecompress.quant.gptq import hessian_weighted_error, quantize_gptq
from moecompress.quant.rtn import quantize_rtn


@pytest.mark.parametrize("k", [1, 4, 5, 6, 128, 257])
def test_base3_packing_is_bit_exact_at_five_trits_per_byte(k):
    codes = torch.randint(0, 3, (7, k), dtype=torch.uint8)
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (7, -(-k // 5))
    assert torch.equal(unpack_trits(packed, k), codes)


def test_base3_packing_rejects_non_trits():
    with pytest.raises(ValueError, match="not a trit"):
        pack_trits(torch.full((1, 5), 3, dtype=torch.uint8))


@pytest.mark.parametrize("group_size", [0, -1, 64])
@pytest.mark.parametrize("packing", ["bits", "base3"])
def test_ternary_codes_scales_and_packed_round_trip(group_size, packing):
    w = torch.randn(48, 240)
    fmt = ternary_format(group_size, packing)
    qt = quantize_rtn(w, fmt)
    values = qt.codes.to(torch.int16) - 1
    assert set(values.unique().tolist()) == {-1, 0, 1}
    assert qt.scales.shape == (1 if group_size == 0 else 48, fmt.groups(240))
    packed = pack(qt)
    assert "weight_zero_point" not in packed.tensors
    back = unpack(packed)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.dequantize(), qt.dequantize())
    bits_per_weight = (
        8 * packed.tensors["weight_packed"].numel() * packed.tensors["weight_packed"].element_size() / w.numel()
    )
    assert bits_per_weight == pytest.approx(fmt.code_bits, rel=1e-9)


def test_lsq_scales_never_lose_to_absmean_and_both_beat_nothing():
    w = torch.randn(64, 256) * torch.rand(64, 1)
    fmt = ternary_format(128)
    errors = {
        m: float((quantize_rtn(w, fmt, ternary_scale=m).dequantize() - w).pow(2).sum() / w.pow(2).sum())
        for m in ("absmean", "lsq")
    }
    assert errors["lsq"] <= errors["absmean"] < 0.35
    # absmean is BitNet's mean |w| per group
    assert torch.allclose(ternary_scales(w, fmt, "absmean"), w.abs().reshape(64, 2, 128).mean(-1), rtol=1e-3)


def test_gptq_feedback_lowers_the_output_error_of_ternary():
    w = torch.randn(64, 256)
    x = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.3  # correlated inputs, where feedback matters
    h = x.T @ x
    fmt = ternary_format(128)
    rtn = hessian_weighted_error(w, quantize_rtn(w, fmt).dequantize(), h)
    gptq = hessian_weighted_error(w, quantize_gptq(w, h, fmt).dequantize(), h)
    assert gptq < 0.9 * rtn


def test_ternary_format_validation():
    with pytest.raises(ValueError, match="ternary packing 'base5'"):
        ternary_format(128, "base5")
    with pytest.raises(ValueError, match="bits=2 and sym=True"):
        QuantFormat.from_dict({"bits": 3, "group_size": 128, "sym": True, "ternary": True, "packing": "base3"})
    with pytest.raises(ValueError, match="ternary only"):
        IntFormat(4, 0)
    fmt = ternary_format(0)
    assert QuantFormat.from_dict(fmt.to_dict()) == fmt and fmt.name == "ternary-tensor-base3" and fmt.key == "ternary"
