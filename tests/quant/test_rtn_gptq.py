import pytest
import torch

from moecompress.errors import MoECompressError
from moecompress.quant.gptq import hessian_weighted_error, quantize_gptq
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
