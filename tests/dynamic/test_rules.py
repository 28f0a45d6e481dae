import torch

from moecompress.dynamic.rules import ratio_keep, relaxed_bernoulli, score_keep, threshold_for_fraction, top_slot


def test_ratio_rule_always_keeps_the_top_expert_and_drops_weights_below_beta_times_top():
    w = torch.rand(500, 4)
    keep = ratio_keep(w, 0.6)
    top = w.max(-1, keepdim=True).values
    assert keep[top_slot(w)].all()
    assert torch.equal(keep & ~top_slot(w), (w >= 0.6 * top) & ~top_slot(w))


def test_score_rule_uses_each_tokens_alpha_and_threshold_and_may_drop_every_expert():
    w = torch.rand(300, 2)
    alpha, tau = torch.rand(300) * 2, torch.rand(300)
    keep = score_keep(w, alpha, tau)
    assert torch.equal(keep, alpha[:, None] * w >= tau[:, None])
    assert (~keep).all(-1).any()


def test_threshold_hits_the_requested_fraction_on_fresh_random_values():
    values = torch.randn(10_000)
    for fraction in (0.0, 0.1, 0.37, 0.9, 1.0):
        t = threshold_for_fraction(values, fraction)
        assert abs(float((values < t).double().mean()) - fraction) < 1e-3


def test_relaxed_bernoulli_is_hard_in_the_forward_and_differentiable_in_the_backward():
    logits = torch.randn(2000, 3, requires_grad=True)
    sample = relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(sample.detach(), sample.detach().round(), atol=1e-6)
    # the keep rate follows sigmoid(logits)
    assert abs(float(sample.detach().mean()) - float(torch.sigmoid(logits.detach()).mean())) < 0.03
    sample.sum().backward()
    assert logits.grad.abs().sum() > 0
