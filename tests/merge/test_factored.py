"""Factored experts: base + low-rank deltas, plain and whitened truncation (fresh random inputs each run)."""

import pytest
import torch

from moecompress.formats import IntFormat
from moecompress.merge.factored import (
    candidate_errors,
    delta_spectrum,
    dense_errors,
    quantize_delta,
    whitening,
)
from moecompress.quant.gptq import quantize_gptq
from moecompress.quant.rtn import quantize_rtn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_full_rank_factors_reproduce_every_delta_whitened_or_not():
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(100, 40).double()
    for w, delta in ((torch.randn(24, 40), torch.randn(24, 40)) for _ in range(3)):
        for lower in (None, whitening(x.T @ x)):
            spec = delta_spectrum(delta, w, lower, 24)
            assert spec.left.shape == (24, 24) and spec.right.shape == (24, 40)
            assert rel(spec.left @ spec.right, delta) < 1e-10
            energy = (delta.double() @ lower if lower is not None else delta.double()).pow(2).sum()
            assert float(spec.tail[0]) == pytest.approx(float(energy), rel=1e-10)  # rank 0 loses all of it


def test_whitened_truncation_has_the_least_output_error_and_plain_the_least_weight_error():
    """On inputs with very unequal channel scales, truncating D L (G = L L^T) beats plain truncation on the
    outputs X D^T, and loses to it on the weights; both at rank 8 of 32 (Eckart-Young in each norm)."""
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(500, 32).double() * torch.logspace(0, -2, 32).double()
    delta = torch.randn(48, 32).double()
    factors = {}
    for name, lower in (("plain", None), ("w", whitening(x.T @ x))):
        spec = delta_spectrum(delta, delta, lower, 8)
        factors[name] = (spec.left, spec.right)
    outputs = {name: float((x @ (delta - a @ b).T).norm()) for name, (a, b) in factors.items()}
    weights = {name: float((delta - a @ b).norm()) for name, (a, b) in factors.items()}
    assert outputs["w"] < 0.9 * outputs["plain"]
    assert weights["plain"] < weights["w"]


def _case(out: int = 48, inp: int = 64, tokens: int = 600):
    """Inputs with unequal channel scales, an expert and its delta to a nearby base (fresh random each run)."""
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(tokens, inp).double() * torch.logspace(0, -1.5, inp).double()
    w = torch.randn(out, inp).double()
    return x, w, 0.3 * torch.randn(out, inp).double()


def test_candidate_error_estimates_track_the_measured_output_error_of_rounded_factors():
    """The allocator's cost of (rank, format) against the output error actually measured with both factors
    rounded to nearest at that rank, whitened and plain; within 25 % (first-order estimate, diagonal Gram)."""
    x, w, delta = _case()
    fmts = [IntFormat(2, 32), IntFormat(4, 32), IntFormat(8, 32)]
    ranks = [4, 8, 16, 32]
    for gram in (x.T @ x, None):
        lower = whitening(gram) if gram is not None else None
        spec = delta_spectrum(delta, w, lower, 32)
        estimate = candidate_errors(spec, ranks, fmts, lower)
        for i, r in enumerate(ranks):
            for j, fmt in enumerate(fmts):
                a = quantize_rtn(spec.left[:, :r].float(), fmt).dequantize().double()
                b = quantize_rtn(spec.right[:r].float(), fmt).dequantize().double()
                error = a @ b - delta
                measured = float((x @ error.T).pow(2).sum() if gram is not None else error.pow(2).sum())
                assert 0.75 < float(estimate[i, j]) / measured < 1.3, (r, fmt.name, gram is None)
        if gram is not None:  # rank 0: the whole delta's output energy (the whitening's damping adds a little)
            assert float(spec.tail[0]) == pytest.approx(float((x @ delta.T).pow(2).sum()), rel=0.05)


def test_quantized_delta_refits_its_output_factor_and_beats_rounding_both_factors():
    """lora_B refit to the rounded lora_A (and both GPTQ'd) has less output error than both rounded to nearest;
    at w8 and full rank the delta is reproduced to 1e-3 of its output energy."""
    x, w, delta = _case()
    gram = x.T @ x
    spec = delta_spectrum(delta, w, whitening(gram), 48)
    gains = []
    for r, fmt in ((8, IntFormat(2, 32)), (16, IntFormat(3, 32)), (32, IntFormat(2, 32))):
        lora_a, lora_b = quantize_delta(delta, spec, r, fmt, gram, lambda m, h, f: quantize_gptq(m, h, f))
        assert lora_a.shape == (r, 64) and lora_b.shape == (48, r)
        ours = lora_b.dequantize().double() @ lora_a.dequantize().double() - delta
        a = quantize_rtn(spec.left[:, :r].float(), fmt).dequantize().double()
        b = quantize_rtn(spec.right[:r].float(), fmt).dequantize().double()
        gains.append(float((x @ ours.T).norm() / (x @ (a @ b - delta).T).norm()))
    assert max(gains) < 1.02 and min(gains) < 0.9, gains
    lora_a, lora_b = quantize_delta(delta, spec, 48, IntFormat(8, 32), gram, lambda m, h, f: quantize_gptq(m, h, f))
    error = lora_b.dequantize().double() @ lora_a.dequantize().double() - delta
    assert float((x @ error.T).pow(2).sum() / (x @ delta.T).pow(2).sum()) < 1e-3


def test_dense_errors_are_the_output_errors_of_the_rounded_delta():
    x, w, delta = _case()
    gram = x.T @ x
    lower = whitening(gram, damp=0.0)
    fmts = [IntFormat(2, 32), IntFormat(8, 32)]
    errors = dense_errors(delta, fmts, lower)
    for fmt, error in zip(fmts, errors.tolist()):
        rounded = quantize_rtn(delta.float(), fmt).dequantize().double()
        assert error == pytest.approx(float((x @ (rounded - delta).T).pow(2).sum()), rel=1e-6)
    assert errors[1] < errors[0] / 1000  # 6 more bits: 4^6 less error
