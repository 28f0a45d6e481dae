"""The quantizers and packing run on whatever device their inputs are on (a `device: cuda` recipe hands them CUDA
tensors). Checked without a GPU: with "meta" as the default device, any tensor made without `device=` is a meta
tensor, and mixing it with the CPU inputs raises or puts the result on the wrong device."""

import pytest
import torch

from moecompress.formats import IntFormat, pack, ternary_format, unpack
from moecompress.quant.gptq import quantize_gptq_shared
from moecompress.quant.rtn import quantize_rtn

FORMATS = [IntFormat(2, 32), IntFormat(3, 32, sym=True), IntFormat(4, 32), ternary_format(32, "base3")]


def _same(a, b):
    assert a.codes.device == b.codes.device == torch.device("cpu")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_makes_its_tensors_on_the_inputs_device(act_order):
    w = torch.randn(24, 96)
    x = torch.randn(256, 96)
    h = x.T @ x
    expected = quantize_gptq_shared([w] * len(FORMATS), h, FORMATS, act_order=act_order)
    with torch.device("meta"):
        got = quantize_gptq_shared([w] * len(FORMATS), h, FORMATS, act_order=act_order)
    for a, b in zip(got, expected):
        _same(a, b)


@pytest.mark.parametrize("fmt", [*FORMATS, ternary_format(32, "bits")], ids=lambda f: f.name)
def test_rtn_and_packing_make_their_tensors_on_the_inputs_device(fmt):
    w = torch.randn(24, 100)
    expected = quantize_rtn(w, fmt)
    with torch.device("meta"):
        got = quantize_rtn(w, fmt)
        packed = pack(got)
        back = unpack(packed)
    _same(got, expected)
    assert packed.tensors["weight_packed"].device == torch.device("cpu")
    assert torch.equal(back.codes, expected.codes)
