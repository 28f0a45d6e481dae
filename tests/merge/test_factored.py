"""Factored experts: base + low-rank deltas, plain and whitened truncation (fresh random inputs each run)."""

import torch

from moecompress.merge.factored import factor_experts, low_rank, rank_for_budget


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_full_rank_factors_reproduce_every_expert_and_the_base_is_the_weighted_mean():
    torch.manual_seed(torch.seed() % 2**31)
    experts = [torch.randn(24, 40) for _ in range(5)]
    freqs = torch.rand(5)
    base, factors = factor_experts(experts, freqs, rank=24)
    mean = sum(f * w.double() for f, w in zip(freqs.double() / freqs.double().sum(), experts))
    assert rel(base, mean) < 1e-12
    for w, (a, b) in zip(experts, factors):
        assert a.shape == (24, 24) and b.shape == (24, 40)
        assert rel(base + a @ b, w) < 1e-10


def test_whitened_truncation_has_the_least_output_error_and_plain_the_least_weight_error():
    """On inputs with very unequal channel scales, truncating D L (G = L L^T) beats plain truncation on the
    outputs X D^T, and loses to it on the weights; both at rank 8 of 32 (Eckart-Young in each norm)."""
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(500, 32).double() * torch.logspace(0, -2, 32).double()
    delta = torch.randn(48, 32).double()
    plain, whitened = low_rank(delta, 8), low_rank(delta, 8, x.T @ x)
    outputs = {name: float((x @ (delta - a @ b).T).norm()) for name, (a, b) in (("plain", plain), ("w", whitened))}
    weights = {name: float((delta - a @ b).norm()) for name, (a, b) in (("plain", plain), ("w", whitened))}
    assert outputs["w"] < 0.9 * outputs["plain"]
    assert weights["plain"] < weights["w"]


def test_rank_for_budget_fills_the_budget_without_exceeding_it():
    for out, inp, experts, fraction in ((256, 256, 16, 0.5), (768, 2048, 128, 0.25), (96, 64, 8, 0.75)):
        r = rank_for_budget(out, inp, experts, fraction)
        dense = experts * out * inp
        used = out * inp + experts * r * (out + inp)
        assert used <= fraction * dense < used + experts * (out + inp)
    assert rank_for_budget(256, 256, 16, 0.5) == 56
    assert rank_for_budget(64, 64, 4, 0.2) == 0  # the base alone is over budget
