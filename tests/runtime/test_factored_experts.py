"""FactoredExperts: the base-once forward equals the dense experts it stands for (fresh random inputs each run)."""

import contextlib

import pytest
import torch
from torch import nn

from moecompress.formats import IntFormat, pack
from moecompress.models.base import PROJECTIONS, GatedActivation
from moecompress.quant.rtn import quantize_rtn
from moecompress.runtime import native
from moecompress.runtime.factored_experts import DENSE, FactoredExperts

H, INTER, E = 40, 24, 5
SHAPES = {"gate_proj": (INTER, H), "up_proj": (INTER, H), "down_proj": (H, INTER)}


def _factored(ranks: list[dict[str, int]], base: bool = True) -> FactoredExperts:
    """Random packed base (or none) and deltas; rank -1: a dense delta."""
    fmts = [IntFormat(4, 16), IntFormat(2, 32), IntFormat(3, -1), IntFormat(8, 16)]
    deltas = [
        {
            p: (r[p], fmts[(e + k) % 4], fmts[(e + k + 1) % 4] if r[p] > 0 else None) if r[p] else (0, None, None)
            for k, p in enumerate(r)
        }
        for e, r in enumerate(ranks)
    ]
    base_formats = {p: IntFormat(4, 16) for p in PROJECTIONS} if base else None
    module = FactoredExperts(H, INTER, base_formats, deltas, GatedActivation(nn.SiLU()))
    for p in PROJECTIONS:
        if base:
            getattr(module.base, p).load_packed(pack(quantize_rtn(torch.randn(SHAPES[p]), IntFormat(4, 16))))
        for e, d in enumerate(deltas):
            r, fa, fb = d[p]
            if r == DENSE:
                getattr(module[e], p).load((pack(quantize_rtn(torch.randn(SHAPES[p]) / 2, fa)),))
            elif r:
                a = pack(quantize_rtn(torch.randn(r, SHAPES[p][1]) / 4, fa))
                getattr(module[e], p).load((a, pack(quantize_rtn(torch.randn(SHAPES[p][0], r) / 4, fb))))
    return module


def _reference(module: FactoredExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token by token in float64 from each expert's dense weights W_0 + lora_B lora_A."""
    dense = [module.expert_weights(e, torch.float64) for e in range(E)]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            w, xt = dense[int(index[t, k])], x[t].double()
            h = nn.functional.silu(w.gate_proj @ xt) * (w.up_proj @ xt)
            out[t] += float(weights[t, k]) * (w.down_proj @ h)
    return out


@pytest.mark.parametrize("base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("path,tolerance", [("torch", 1e-5), ("native fp32", 1e-5), ("native int8", 3e-2)])
def test_the_base_once_forward_equals_the_dense_experts_it_stands_for(path, tolerance, base):
    """Ranks 0 (base alone, or zero without a base), odd and full, dense deltas, mixed formats; one expert no
    token reaches; 1 and 9 tokens. The torch path (dequantized copies), and the native GEMV with float32 or int8
    activations."""
    if path != "torch" and native.library() is None:
        pytest.skip(f"no native kernels here: {native.kernel_name()}")
    torch.manual_seed(torch.seed() % 2**31)
    ranks = [
        {"gate_proj": 3, "up_proj": 0, "down_proj": 7},
        {"gate_proj": 0, "up_proj": DENSE, "down_proj": 0},
        {"gate_proj": 24, "up_proj": 5, "down_proj": DENSE},
        {"gate_proj": DENSE, "up_proj": 8, "down_proj": 0},
        {"gate_proj": 2, "up_proj": 11, "down_proj": 24},
    ]
    if not base:  # rank 0 is then a zero projection: only for the expert no token reaches
        ranks = [{p: r or DENSE for p, r in d.items()} for d in ranks[:4]] + [{p: 0 for p in PROJECTIONS}]
    module = _factored(ranks, base)
    module.set_cache_dequantized(path == "torch")
    for tokens in (1, 9):
        x = torch.randn(tokens, H)
        index = torch.stack([torch.randperm(E - 1)[:2] for _ in range(tokens)])  # expert 4: no token
        weights = torch.rand(tokens, 2) + 0.1
        assert module._native(x) == (path != "torch")
        with native.float32_activations() if path != "native int8" else contextlib.nullcontext():
            got = module(x, index, weights)
        want = _reference(module, x, index, weights)
        assert float((got.double() - want).norm() / want.norm()) < tolerance


def test_a_rank_zero_expert_is_the_base_and_stores_no_factor():
    module = _factored([{p: 0 for p in PROJECTIONS}] * E)
    names = {n for n, _ in module.named_buffers()}
    assert not any("lora" in n for n in names) and "base.gate_proj.weight_packed" in names
    w0 = module.expert_weights(0)
    for p in PROJECTIONS:
        assert torch.equal(w0[p], getattr(module.base, p).dequantize())


def test_the_native_path_reads_weights_loaded_after_its_first_call():
    """Its descriptors are made once per module and point into the packed buffers: weights loaded in place after the
    first call are the ones read."""
    if native.library() is None:
        pytest.skip(f"no native kernels here: {native.kernel_name()}")
    module = _factored([{p: DENSE for p in PROJECTIONS}] * E, base=False)
    x, index, weights = torch.randn(3, H), torch.tensor([[0, 1], [1, 2], [0, 2]]), torch.rand(3, 2) + 0.1
    with native.float32_activations():
        module(x, index, weights)
        fmt = module[0].gate_proj.weight.fmt
        module[0].gate_proj.load((pack(quantize_rtn(torch.randn(INTER, H), fmt)),))
        got = module(x, index, weights)
    want = _reference(module, x, index, weights)
    assert float((got.double() - want).norm() / want.norm()) < 1e-5
