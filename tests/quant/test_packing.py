import pytest
import torch

from moecompress.formats import IntFormat, pack, unpack
from moecompress.formats.bitpack import pack_codes, packed_words, unpack_codes
from moecompress.quant.rtn import quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 7, 128, 129, 256])
def test_pack_unpack_is_bit_exact(bits, k):
    codes = torch.randint(0, 2**bits, (5, k), dtype=torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (5, packed_words(k, bits))
    assert torch.equal(unpack_codes(words, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_size_is_bits_per_weight(bits):
    words = pack_codes(torch.randint(0, 2**bits, (4, 1024), dtype=torch.uint8), bits)
    assert words.numel() * 32 == 4 * 1024 * bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_tensor_round_trip_dequantizes_identically(bits):
    w = torch.randn(64, 300)
    qt = quantize_rtn(w, IntFormat(bits, 128))
    back = unpack(pack(qt))
    assert (
        torch.equal(back.codes, qt.codes) and torch.equal(back.scales, qt.scales) and torch.equal(back.zeros, qt.zeros)
    )
    assert torch.equal(back.dequantize(), qt.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 2**bits, (16, 256), dtype=torch.uint8)
    theirs = helpers.pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(pack_codes(codes, bits), theirs)
