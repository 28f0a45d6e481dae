"""SharedInputFusion (runtime/shared_input.py): native linear calls that read the same activations become one call."""

import operator

import pytest
import torch

from moecompress.formats import IntFormat, pack
from moecompress.quant.rtn import quantize_rtn
from moecompress.runtime import native
from moecompress.runtime.decode import INDUCTOR_OPTIONS, dense_linear_op, quantized_linear_op
from moecompress.runtime.native_linear import NativeLinear
from moecompress.runtime.quantized_linear import install_quantized_linear
from moecompress.runtime.shared_input import SharedInputFusion

from .test_native import rel_err

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernels (no C++ compiler)")
ops = torch.ops.moecompress


def targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_dense_calls_on_one_input_become_one_call():
    def step(x, y, wq, wk, wv, wo, b):  # q, k, v read x; o reads y: it stays alone
        return (
            dense_linear_op(wq, None, x),
            dense_linear_op(wk, b, x),
            dense_linear_op(wv, None, x) + 1,
            dense_linear_op(wo, None, y),
        )

    gm = torch.fx.symbolic_trace(step)
    args = (
        torch.randn(1, 96),
        torch.randn(1, 96),
        torch.randn(64, 96).bfloat16(),
        torch.randn(16, 96),
        torch.randn(24, 96),
    )
    args += (torch.randn(8, 96), torch.randn(16))
    expected = gm(*args)
    SharedInputFusion()(gm.graph)
    gm.recompile()
    assert targets(gm).count(ops.dense_linears.default) == 1 and targets(gm).count(ops.dense_linear.default) == 1
    for y, e in zip(gm(*args), expected):
        assert torch.equal(y, e)


def test_quantized_calls_on_one_input_become_one_call():
    holder = torch.nn.Module()
    for name, (out, bits) in {"q": (64, 4), "k": (16, 4), "v": (24, 8)}.items():
        fmt = IntFormat(bits, 32)
        setattr(holder, name, torch.nn.Linear(128, out))
        install_quantized_linear(holder, name, fmt, pack(quantize_rtn(getattr(holder, name).weight.detach(), fmt)))

    def step(x):
        return quantized_linear_op(holder.q, x), quantized_linear_op(holder.k, x), quantized_linear_op(holder.v, x)

    gm = torch.fx.symbolic_trace(step)
    x = torch.randn(1, 128)
    expected = [getattr(holder, n).native_forward(x) for n in "qkv"]
    SharedInputFusion()(gm.graph)
    gm.recompile()
    assert targets(gm) == [ops.quantized_linears.default] + [operator.getitem] * 3
    with torch.no_grad():
        for y, e in zip(gm(x), expected):
            assert torch.equal(y, e)


def test_compiled_linears_sharing_an_input_run_as_one_native_call(monkeypatch):
    """In a compiled graph (the decode step's inductor options) three native linears on one input run through one
    `dense_linears` call and give the eager result."""
    calls = []
    dense_linears = native.dense_linears
    monkeypatch.setattr(native, "dense_linears", lambda *a: calls.append(len(a[0])) or dense_linears(*a))
    layer = torch.nn.ModuleList(NativeLinear(256, 512) for _ in range(3))  # 512 KiB each: native in the graph
    x = torch.randn(1, 256)
    torch._dynamo.reset()
    step = torch.compile(lambda x: [m(x) for m in layer], fullgraph=True, options=INDUCTOR_OPTIONS)
    with torch.no_grad():
        got = step(x)
        for y, m in zip(got, layer):
            assert rel_err(y, x.double() @ m.weight.double().T + m.bias.double()) < 1e-5
    assert calls == [3]
