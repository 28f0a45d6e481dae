import pytest
import torch

from moecompress.errors import MoECompressError
from moecompress.formats import IntFormat, QTensor, QuantFormat, ternary_format
from moecompress.quant.gptq import hessian_weighted_error, quantize_gptq, quantize_gptq_batched, quantize_gptq_shared
from moecompress.quant.rtn import quantize_rtn


def correlated_inputs(n: int, k: int) -> torch.Tensor:
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    return torch.randn(n, k) @ mix * torch.linspace(0.2, 3.0, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_error_is_half_a_step_except_at_the_clipped_range_ends(bits, sym):
    w = torch.randn(32, 256)
    qt = quantize_rtn(w, IntFormat(bits, 128, sym))
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
    fmt = IntFormat(bits, 128)
    err_rtn = hessian_weighted_error(w, quantize_rtn(w, fmt).dequantize(), h)
    err_gptq = hessian_weighted_error(w, quantize_gptq(w, h, fmt, act_order=act_order).dequantize(), h)
    assert err_gptq < (0.6 if act_order else 0.9) * err_rtn


def test_gptq_handles_a_rank_deficient_hessian():
    w = torch.randn(16, 128)
    x = torch.randn(20, 128)  # 20 tokens < 128 features
    qt = quantize_gptq(w, x.T @ x, IntFormat(4, 128))
    assert torch.isfinite(qt.dequantize()).all()


def test_gptq_rejects_a_nan_hessian():
    h = torch.full((8, 8), float("nan"))
    with pytest.raises(MoECompressError, match="calibration"):
        quantize_gptq(torch.randn(4, 8), h, IntFormat(4, -1))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_in_several_formats_at_once_gives_each_format_its_own_codes(act_order, clip_search):
    """One pass for all widths (the factored stage's candidates) must equal one call per width, bit for bit, with a
    dead input column and a ternary format among them."""
    w = torch.randn(48, 192) * 0.05
    x = correlated_inputs(1024, 192)
    x[:, 5] = 0
    h = x.T @ x
    formats = [IntFormat(b, 64, sym) for b in (2, 3, 4, 8) for sym in (False, True)]
    formats.append(ternary_format(64, "base3"))
    together = quantize_gptq_shared([w] * len(formats), h, formats, act_order=act_order, clip_search=clip_search)
    for fmt, q in zip(formats, together):
        alone = quantize_gptq(w, h, fmt, act_order=act_order, clip_search=clip_search)
        assert q.fmt == fmt
        assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
        assert torch.equal(q.zeros, alone.zeros)
    errors = [hessian_weighted_error(w, q.dequantize(), h) for q in together[:8:2]]
    assert errors == sorted(errors, reverse=True)  # 2 > 3 > 4 > 8 bits: the formats did not swap rows


def _textbook_gptq(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as the paper states it, in float64, one column at a time with no lazy batching: the codes."""
    W = w.double().clone()
    H = h.double() + damp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes = torch.empty_like(W)
    for i in range(W.shape[1]):
        if i % fmt.group_size == 0:
            scale, zero = (t.double() for t in fmt.group_params(W[:, i : i + fmt.group_size]))
        codes[:, i] = torch.clamp(torch.round(W[:, i] / scale) + zero, 0, fmt.maxq)
        err = (W[:, i] - (codes[:, i] - zero) * scale) / U[i, i]
        W[:, i:] -= err[:, None] * U[i, i:][None, :]
    return codes


@pytest.mark.parametrize("block_size", [128, 64])
def test_gptq_matches_the_textbook_algorithm_in_float64(block_size):
    """The blocked float32 loop (two levels of lazy updates, a reversed-order Cholesky) is the algorithm: at most a
    few codes differ by float rounding, and the output error matches to 1e-3."""
    w = torch.randn(64, 320)
    x = correlated_inputs(1536, 320)
    h = x.T @ x
    fmt = IntFormat(3, 32)
    ours = quantize_gptq(w, h, fmt, block_size=block_size)
    reference = _textbook_gptq(w, h, fmt)
    assert (ours.codes.double() != reference).double().mean() < 1e-3
    err_ours = hessian_weighted_error(w, ours.dequantize(), h)
    rounded = QTensor(reference.to(torch.uint8), ours.scales, ours.zeros, fmt)  # same scales unless codes diverged
    err_reference = hessian_weighted_error(w, rounded.dequantize(), h)
    assert abs(err_ours - err_reference) < 1e-3 * err_reference
    assert err_ours < 0.9 * hessian_weighted_error(w, quantize_rtn(w, fmt).dequantize(), h)


def test_gptq_of_matrices_sharing_a_hessian_equals_one_call_each():
    """An expert's gate and up share their inputs, so one pass rounds both: the codes of one call each."""
    x = correlated_inputs(1024, 128)
    h = x.T @ x
    gate, up = torch.randn(40, 128), torch.randn(24, 128) * 3
    formats = [IntFormat(4, 32), IntFormat(2, 32, sym=True)]
    for w, fmt, q in zip([gate, up], formats, quantize_gptq_shared([gate, up], h, formats)):
        alone = quantize_gptq(w, h, fmt)
        assert q.codes.shape == w.shape and torch.equal(q.codes, alone.codes)
        assert torch.equal(q.scales, alone.scales) and torch.equal(q.zeros, alone.zeros)


@pytest.mark.parametrize(
    "fmt", [IntFormat(4, 32), IntFormat(3, -1, sym=True), ternary_format(-1, "bits")], ids=lambda f: f.name
)
def test_batched_gptq_gives_every_expert_the_codes_of_its_own_call(fmt):
    """Experts stacked in one column loop (one Hessian each, some with dead inputs) get the codes, scales and zero
    points of one call each, whatever the batch they are in."""
    experts = []
    for b in range(5):
        x = correlated_inputs(512, 96)
        x[:, b] = 0
        experts.append(([torch.randn(40, 96), torch.randn(40, 96) * (b + 1)], x.T @ x))
    batched = quantize_gptq_batched(experts, [fmt, fmt])
    assert [len(q) for q in batched] == [2] * 5
    for (weights, h), quantized in zip(experts, batched):
        for q, alone in zip(quantized, quantize_gptq_shared(weights, h, [fmt, fmt])):
            assert torch.equal(q.codes, alone.codes) and torch.equal(q.scales, alone.scales)
            assert torch.equal(q.zeros, alone.zeros)
    again = quantize_gptq_batched(experts[3:], [fmt, fmt])  # another batch: the same codes
    assert all(torch.equal(a.codes, b.codes) for qs, rs in zip(again, batched[3:]) for a, b in zip(qs, rs))
    with pytest.raises(ValueError, match="one expert at a time"):
        quantize_gptq_batched(experts, [fmt, fmt], act_order=True)


def test_gptq_in_several_formats_needs_one_group_size():
    h = torch.eye(64)
    with pytest.raises(ValueError, match="group size"):
        w = torch.randn(4, 64)
        quantize_gptq_shared([w, w], h, [IntFormat(4, 32), IntFormat(4, 64)])
