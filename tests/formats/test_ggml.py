"""llama.cpp's block types as packed formats (formats/ggml.py, formats/ggml_blocks.py): the bytes we store are the
blocks llama.cpp reads, checked against llama.cpp's own Python package (`gguf.quants`), and GPTQ onto them."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

from moecompress.formats import FORMATS, QuantFormat, pack, unpack  # noqa: E402
from moecompress.formats.ggml import GGML_TYPES, GGMLFormat  # noqa: E402
from moecompress.quant.gptq import hessian_weighted_error, quantize_gptq, quantize_gptq_shared  # noqa: E402
from moecompress.quant.rtn import quantize_rtn  # noqa: E402

TYPES = list(GGML_TYPES)
# relative error of plain rounding of Gaussian weights, about what each type gives (fails if a grid is broken)
RTN_BOUND = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.05, "Q4_0": 0.1, "Q4_1": 0.1, "Q4_K": 0.1, "Q3_K": 0.2, "Q2_K": 0.35}


def llama_cpp_values(fmt: QuantFormat, packed) -> np.ndarray:
    return dequantize(packed.tensors["weight_packed"].numpy(), getattr(gguf.GGMLQuantizationType, fmt.name))


def same_bits(a: np.ndarray, b: torch.Tensor) -> bool:
    return np.array_equal(a.astype(np.float32).view(np.uint32), b.numpy().view(np.uint32))


def correlated_hessian(n: int) -> torch.Tensor:
    x = torch.randn(2048, n) @ (0.2 * torch.randn(n, n) + torch.eye(n))
    x[:, :8] *= 10  # a few loud channels, as in trained transformers
    return x.T @ x / 2048


@pytest.mark.parametrize("name", TYPES)
def test_rounded_blocks_read_back_in_llama_cpp_bit_for_bit(name):
    fmt = GGMLFormat.of_type(name)
    w = torch.randn(12, 512, dtype=torch.float64) * (torch.rand(12, 1, dtype=torch.float64) + 0.05)
    qt = fmt.round(w)
    packed = pack(qt)
    assert packed.tensors["weight_packed"].shape == (12, 512 // fmt.ggml.block * fmt.ggml.type_size)
    assert packed.nbytes * 8 / w.numel() == fmt.ggml.bits_per_weight
    ours = qt.dequantize()
    assert same_bits(llama_cpp_values(fmt, packed), ours)
    back = unpack(packed)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.dequantize(), ours)
    assert float((ours.double() - w).norm() / w.norm()) < RTN_BOUND[name]
    assert QuantFormat.from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize("name", TYPES)
def test_gptq_onto_the_type_is_exact_in_llama_cpp_and_beats_rounding(name):
    fmt = GGMLFormat.of_type(name)
    h = correlated_hessian(256)
    w = torch.randn(32, 256)
    gate, up = quantize_gptq_shared([w, 2 * w], h, [fmt, fmt])
    for qt in (gate, up):
        assert same_bits(llama_cpp_values(fmt, pack(qt)), qt.dequantize())
    alone = quantize_gptq(w, h, fmt)
    assert torch.equal(alone.codes, gate.codes)  # gate and up share one pass, each is its own GPTQ
    rtn, weighted = quantize_rtn(w, fmt), fmt.round(w, torch.diag(h))
    err = {
        k: hessian_weighted_error(w, q.dequantize(), h) for k, q in {"gptq": gate, "rtn": rtn, "imat": weighted}.items()
    }
    assert err["imat"] <= err["rtn"] * 1.001
    assert err["gptq"] < 0.6 * err["imat"], err


def test_a_row_that_does_not_fill_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="blocks of 256 weights; a row of 320"):
        GGMLFormat.of_type("Q4_K").round(torch.randn(4, 320))
    assert pack(GGMLFormat.of_type("Q4_0").round(torch.randn(4, 320))).shape == (4, 320)


def test_a_type_names_its_own_grid_and_its_ladder():
    q4k = GGMLFormat.of_type("Q4_K")
    assert (q4k.bits, q4k.group_size, q4k.sym, q4k.name) == (4, 32, False, "Q4_K")
    assert FORMATS["Q4_K"].for_bits(2, 128, False).name == "Q2_K"
    assert FORMATS["Q4_0"].for_bits(8, 128, False).name == "Q8_0"
    with pytest.raises(ValueError, match="no GGML type of 2 bits"):
        FORMATS["Q4_0"].for_bits(2, 128, False)
    with pytest.raises(ValueError, match="Q4_K has 4-bit codes in groups of 32"):
        FORMATS["Q4_K"](4, 128, False)


@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0"])
def test_ternary_codes_become_llama_cpps_ternary_blocks_exactly(name):
    from moecompress.formats import ternary_format
    from moecompress.formats.ggml_blocks import pack_ternary
    from moecompress.quant.rtn import quantize_rtn

    qt = quantize_rtn(torch.randn(8, 512), ternary_format(-1, "base3"), ternary_scale="lsq")
    scales = qt.scales.to(torch.float32).expand(8, 2)  # one scale per row: the same for both blocks of 256
    packed = pack_ternary(qt.codes, scales, name)
    theirs = dequantize(packed.numpy(), getattr(gguf.GGMLQuantizationType, name))
    assert packed.shape == (8, 2 * {"TQ1_0": 54, "TQ2_0": 66}[name])
    assert same_bits(theirs, qt.dequantize())
