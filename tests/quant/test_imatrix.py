"""The rtn-imatrix quantizer (quant/imatrix.py): importance-weighted round-to-nearest."""

import pytest
import torch

import moecompress
from moecompress.formats import IntFormat, ternary_format
from moecompress.quant.config import QuantizationConfig
from moecompress.quant.methods import QUANTIZERS, make_quantizer
from moecompress.recipe import Recipe
from moecompress.runtime.packed_experts import PackedLinear

from ..conftest import CALIB, require_shared


def output_error(w, q, h) -> torch.Tensor:
    """Per row (W - W^) H (W - W^)^T relative to W H W^T, in float64."""
    d, w, h = (w - q.dequantize()).double(), w.double(), h.double()
    return torch.einsum("oi,ij,oj->o", d, h, d) / torch.einsum("oi,ij,oj->o", w, h, w)


@pytest.mark.parametrize("bits,group,gain", [(2, 64, 0.8), (3, 128, 0.8), (4, 128, 0.8), (8, -1, 1.0)])
def test_imatrix_rounding_beats_rtn_where_channels_differ_in_energy(bits, group, gain):
    x = torch.randn(2048, 256) * torch.exp(torch.randn(256))  # channel energies spread over orders of magnitude
    h, w, fmt = x.T @ x, torch.randn(96, 256), IntFormat(bits, group)
    rtn = make_quantizer(QuantizationConfig(method="rtn")).quantize([w], [fmt], h)[0]
    weighted = make_quantizer(QuantizationConfig(method="rtn-imatrix")).quantize([w], [fmt], h)[0]
    assert float(output_error(w, weighted, h).mean()) < gain * float(output_error(w, rtn, h).mean())
    diagonal = torch.diag(torch.diagonal(h))  # the objective it minimizes: never worse than RTN in any row
    assert bool((output_error(w, weighted, diagonal) <= output_error(w, rtn, diagonal) * (1 + 1e-6)).all())


def test_imatrix_is_registered_asks_for_hessians_and_falls_back_without_them():
    assert QUANTIZERS["rtn-imatrix"].statistics == frozenset({"hessian"})
    quantizer = make_quantizer(QuantizationConfig(method="rtn-imatrix"))
    w, fmt = torch.randn(8, 64), ternary_format(64)
    rtn = make_quantizer(QuantizationConfig(method="rtn")).quantize([w], [fmt])[0]
    assert torch.equal(quantizer.quantize([w], [fmt])[0].codes, rtn.codes) and quantizer.used(None) == "rtn"


def test_an_imatrix_recipe_compresses_and_records_its_method(tiny_text_path, tmp_path):
    recipe = Recipe.from_dict(
        {
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 4, "seq_len": 128},
            "quantization": {"method": "rtn-imatrix", "rare_experts": {"policy": "own", "min_tokens": 0}},
        }
    )
    result = moecompress.compress(str(tiny_text_path), recipe, progress=False, stream=False)
    by_method = result.report.experts_by_method
    assert by_method["rtn-imatrix"] > 0 and set(by_method) <= {"rtn-imatrix", "rtn"}  # rtn: experts no token reached
    methods = {m.method for m in result.model.modules() if isinstance(m, PackedLinear)}
    assert methods == set(by_method)
