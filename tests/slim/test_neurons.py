import torch
import torch.nn.functional as F

from moecompress.models.base import ExpertWeights
from moecompress.slim.neurons import slice_expert, stage_widths, taylor_neuron_scores, top_neurons


def test_taylor_score_from_down_weights_equals_activation_times_activation_gradient():
    E, H, N, T = 3, 16, 24, 50
    gate_up = torch.randn(E, 2 * N, H, dtype=torch.float64, requires_grad=True)
    down = torch.randn(E, H, N, dtype=torch.float64, requires_grad=True)
    x, target = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    acts, loss = [], 0
    for e in range(E):
        g, u = F.linear(x, gate_up[e]).chunk(2, dim=-1)
        a = F.silu(g) * u
        a.retain_grad()
        acts.append(a)
        loss = loss + (F.linear(a, down[e]) - target).pow(2).sum()
    loss.backward()
    expected = torch.stack([(a * a.grad).sum(0).abs() for a in acts])
    assert torch.allclose(taylor_neuron_scores(down.detach(), down.grad), expected, rtol=1e-10)


def test_slicing_keeps_exactly_the_chosen_neurons_of_each_expert():
    """Dropping neurons equals masking their activations, biases included (GPT-OSS-style experts)."""
    E, H, N = 4, 8, 12
    keep = top_neurons(torch.rand(E, N), 5)
    x = torch.randn(7, H)
    for e in range(E):
        w = ExpertWeights(torch.randn(N, H), torch.randn(N, H), torch.randn(H, N), torch.randn(N), torch.randn(N), None)
        cut = slice_expert(w, keep[e])
        assert cut.gate_proj.shape == (5, H) and cut.down_proj.shape == (H, 5) and cut.up_bias.shape == (5,)
        mask = torch.zeros(N)
        mask[keep[e]] = 1
        full = F.linear(
            F.silu(F.linear(x, w.gate_proj, w.gate_bias)) * F.linear(x, w.up_proj, w.up_bias) * mask, w.down_proj
        )
        small = F.linear(
            F.silu(F.linear(x, cut.gate_proj, cut.gate_bias)) * F.linear(x, cut.up_proj, cut.up_bias), cut.down_proj
        )
        assert torch.allclose(small, full, atol=1e-5)
    assert torch.equal(keep, keep.sort(dim=1).values)


def test_stage_widths_decrease_geometrically_to_the_target():
    assert stage_widths(256, 128, 3) == [200, 160, 128]
    assert stage_widths(256, 128, 1) == [128]
    widths = stage_widths(768, 192, 4)
    assert widths[-1] == 192 and all(a > b for a, b in zip(widths, widths[1:]))
