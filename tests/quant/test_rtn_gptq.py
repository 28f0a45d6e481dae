import pytest
import torch

from moecompress.errors import MoECompressError
from moecompress.quant.gptq import hessian_weighted_error, quantize_gptq, quantize_gptq_each
from moecompress.quant.qtensor import QuantFormat
from moecompress.quant.rtn import quantize_rtn


def correlated_inputs(n: int, k: int) -> torch.Tensor:
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    return torch.randn(n, k) @ mix * torch.linspace(0.2, 3.0, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_is_half_a_step_except_at_the_clipped_range_ends(bits, sym):
    w = torch.randn(32, 256)
    qt = quantize_rtn(w, QuantFormat(bits, 128, sym))
    step = qt.scales.float().repeat_interleave(128, dim=1)
    err = (w - qt.dequantize()).abs()
    assert (err <= step + 1e-6).all()
    assert (err <= step / 2 + 1e-6).float().mean() > 0.98
    if sym:
        assert (qt.zeros == 2 ** (bits - 1)).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_output_error(bits, act_order):
    w = torch.randn(64, 256)
    x = correlated_inputs(2048, 256)
    h = x.T @ x
    fmt = QuantFormat(bits, 128)
    err_rtn = hessian_weighted_error(w, quantize_rtn(w, fmt).dequantize(), h)
    err_gptq = hessian_weighted_error(w, quantize_gptq(w, h, fmt, act_order=act_order).dequantize(), h)
    assert err_gptq < (0.6 if act_order else 0.9) * err_rtn


def test_gptq_handles_a_rank_deficient_hessian():
    w = torch.randn(16, 128)
    x = torch.randn(20, 128)  # 20 tokens < 128 features
    qt = quantize_gptq(w, x.T @ x, QuantFormat(4, 128))
    assert torch.isfinite(qt.dequantize()).all()


def test_gptq_rejects_a_nan_hessian():
    h = torch.full((8, 8), float("nan"))
    with pytest.raises(MoECompressError, match="calibration"):
        quantize_gptq(torch.randn(4, 8), h, QuantFormat(4, -1))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_in_several_formats_at_once_gives_each_format_its_own_codes(act_order, clip_search):
    """One pass for all widths (the factored stage's candidates) must equal one call per width, bit for bit, with a
    dead input column and a ternary format among them."""
    w = torch.randn(48, 192) * 0.05
    x = correlated_inputs(1024, 192)
    x[:, 5] = 0
    h = x.T @ x
    formats = [QuantFormat(b, 64, sym) for b in (2, 3, 4, 8) for sym in (False, True)]
    formats.append(QuantFormat.make_ternary(64, "base3"))
    together = quantize_gptq_each(w, h, formats, act_order=act_order, clip_search=clip_search)
    for fmt, q in zip(formats, together):
        alone = quantize_gptq(w, h, fmt, act_order=act_order, clip_search=clip_search)
        assert q.fmt == fmt
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
        assert torch.equal(q.zeros, alone.zeros)
    errors = [hessian_weighted_error(w, q.dequantize(), h) for q in together[:8:2]]
    assert errors == sorted(errors, reverse=True)  # 2 > 3 > 4 > 8 bits: the formats did not swap rows


def test_gptq_in_several_formats_needs_one_group_size():
    h = torch.eye(64)
    with pytest.raises(ValueError, match="group size"):
        quantize_gptq_each(torch.randn(4, 64), h, [QuantFormat(4, 32), QuantFormat(4, 64)])
