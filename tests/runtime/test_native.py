"""Native CPU kernels against float64 references computed from the packed data (fresh random inputs)."""

import logging

import pytest
import torch

from moecompress.formats import IntFormat, QuantFormat, pack, ternary_format
from moecompress.models.base import PROJECTIONS
from moecompress.quant.rtn import quantize_rtn
from moecompress.runtime import native
from moecompress.runtime.packed_experts import ExpertList, PackedExperts, PackedLinear

FORMATS = [
    IntFormat(2, 32),
    IntFormat(2, 128, True),
    IntFormat(3, 64),
    IntFormat(3, -1, True),
    IntFormat(4, 128),
    IntFormat(4, 32, True),
    IntFormat(4, 100),
    IntFormat(8, 64),
    IntFormat(8, -1, True),
    ternary_format(128, "bits"),
    ternary_format(-1, "base3"),
    ternary_format(0, "base3"),
]


def quantized_activations(x: torch.Tensor, block: int = 16) -> torch.Tensor:
    """x rounded as the int8 kernels take it (per token, blocks of 16: scale max|x| / 127), in float64."""
    tokens, width = x.shape
    blocks = torch.nn.functional.pad(x, (0, -width % block)).view(tokens, -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks / torch.where(scale > 0, scale, 1)).clamp(-127, 127)
    return (q.double() * scale.double()).view(tokens, -1)[:, :width]


def int8_kernels() -> bool:
    return native.library().moe_cpu_isa() in (2, 4)  # AVX2 or AVX-512 VNNI


@pytest.fixture(autouse=True, params=["widest", "avx2", "avx2-no-vnni", "portable"])
def _kernels(request, monkeypatch):
    """Every test on the widest ISA this CPU has, again with AVX-512 turned off (the AVX2 code, with and without
    AVX-VNNI), and on the portable path, whose decoding is the CUDA kernels' (csrc/common/decode.h)."""
    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.kernel_name()}")
    if request.param.startswith("avx2"):
        monkeypatch.setenv("MOECOMPRESS_NO_AVX512", "1")
        if request.param == "avx2-no-vnni":
            monkeypatch.setenv("MOECOMPRESS_NO_AVXVNNI", "1")
        if not native.kernel_name().startswith("native-avx2"):
            pytest.skip("this CPU has no AVX2")
    if request.param == "portable":
        monkeypatch.setenv("MOECOMPRESS_NO_AVX2", "1")
        assert native.kernel_name() == "native-portable"


def packed_linear(out_features: int, in_features: int, fmt: QuantFormat) -> PackedLinear:
    linear = PackedLinear(out_features, in_features, fmt)
    linear.load_packed(pack(quantize_rtn(torch.randn(out_features, in_features), fmt)))
    return linear


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", [(37, 200), (64, 256), (5, 21)])  # odd N, K not a multiple of 32 or the group
@pytest.mark.parametrize("tokens", [1, 3, 8, 11])
def test_gemv_matches_the_float64_reference_of_the_packed_weight(fmt, shape, tokens):
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    linear = packed_linear(*shape, fmt)
    x = torch.randn(tokens, shape[1])
    reference = x.double() @ linear.dequantize(torch.float64).T
    assert rel_err(native.packed_linear(linear, x), reference) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS + [IntFormat(4, 16), IntFormat(2, 16), IntFormat(3, 256)], ids=lambda f: f.name)
@pytest.mark.parametrize("shape", [(37, 200), (64, 768), (5, 21)])
@pytest.mark.parametrize("tokens", [1, 5, 11])
def test_int8_gemv_is_exact_for_its_rounded_activations(fmt, shape, tokens):
    """The int8 kernels equal the float64 product of the packed weight and the int8-rounded activations, and the
    rounding moves the result by no more than the weight's operator norm times the activations' rounding error
    (formats whose groups the int8 layout cannot take, like g100, run on the float32 kernels and are exact)."""
    if not int8_kernels():
        pytest.skip("no int8 kernels on this path")
    torch.manual_seed(torch.seed() % 2**31)
    linear = packed_linear(*shape, fmt)
    x = torch.randn(tokens, shape[1]) * torch.rand(shape[1]) * 3  # uneven channel scales, as real activations
    weight = linear.dequantize(torch.float64)
    y = native.packed_linear(linear, x, int8=True)
    rounded = native.int8_fits(linear)  # groups the int8 layout takes, on this ISA
    assert rounded == (fmt.effective_group(shape[1]) % 16 == 0 or fmt.groups(shape[1]) == 1) or (
        native.library().moe_cpu_isa() == 2 and fmt.bits == 3  # AVX2: 3-bit codes stay on the float32 kernels
    )
    taken = quantized_activations(x) if rounded else x.double()
    assert rel_err(y, taken @ weight.T) < 1e-5
    assert rel_err(taken, x) < 4 / 254  # per block of 16: every error <= max|x| / 254, the block norm >= max|x|
    exact = x.double() @ weight.T
    bound = torch.linalg.matrix_norm(weight, ord=2) * (taken - x.double()).norm(dim=-1)
    # per token the float32 sums alone reach 1e-5 of a norm now and then (one token in ~30 runs of w8 rows at K=768);
    # the whole output is held to 1e-5 above
    assert ((y.double() - exact).norm(dim=-1) <= bound * 1.001 + 4e-5 * exact.norm(dim=-1)).all()


def mixed_experts(
    num_experts: int = 6, hidden: int = 72, intermediate: int = 40, activation=None, bias: bool = False
) -> PackedExperts:
    formats = [
        dict(zip(("gate_proj", "up_proj", "down_proj"), (FORMATS[(3 * e + i) % len(FORMATS)] for i in range(3))))
        for e in range(num_experts)
    ]
    module = PackedExperts(hidden, intermediate, formats, activation or torch.nn.SiLU(), bias)
    for expert, fmts in zip(module, formats):
        for proj, fmt in fmts.items():
            linear = getattr(expert, proj)
            linear.load_packed(pack(quantize_rtn(torch.randn(linear.out_features, linear.in_features), fmt)))
            if bias:
                linear.bias.copy_(torch.randn(linear.out_features) * 2)
    return module


def float64_moe(module: PackedExperts, x, ids, weights) -> torch.Tensor:
    """The layer in float64 from the packed data: the module's own activation, biases where it has them."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = module[int(ids[t, k])]
            w = {p: getattr(e, p).dequantize(torch.float64) for p in PROJECTIONS}
            b = {p: getattr(e, p).bias for p in PROJECTIONS}
            b = {p: torch.zeros(w[p].shape[0], dtype=torch.float64) if v is None else v.double() for p, v in b.items()}
            xt = x[t].double()
            h = module.activation(w["gate_proj"] @ xt + b["gate_proj"], w["up_proj"] @ xt + b["up_proj"])
            out[t] += float(weights[t, k]) * (w["down_proj"] @ h + b["down_proj"])
    return out


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_fused_moe_forward_matches_float64_and_the_reference_path(tokens, monkeypatch):
    monkeypatch.setattr(native, "INT8_TOKENS", 0)  # float32 activations: exact
    module = mixed_experts()
    x = torch.randn(tokens, 72)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(tokens)])  # expert 5 gets no token
    if tokens == 16:
        ids[:5, 0] = torch.arange(5)  # and with 16 tokens every other expert is used
    weights = torch.rand(tokens, 2).softmax(-1)
    with torch.no_grad():
        assert module.native_usable(x)
        fused = module(x, ids, weights)
        reference = ExpertList.forward(module, x, ids, weights)
    expected = float64_moe(module, x, ids, weights)
    assert rel_err(fused, expected) < 1e-5 and rel_err(reference, expected) < 1e-5


@pytest.mark.parametrize(("tokens", "int8_tokens"), [(1, 8), (6, 8), (40, 8), (2100, 4096)])
def test_fused_int8_forward_is_the_chain_of_int8_projections(tokens, int8_tokens, monkeypatch):
    """Experts with at most INT8_TOKENS tokens whose three projections the int8 layout takes (on AVX2 not 3-bit
    ones) run on the int8 kernels; with 40 tokens and INT8_TOKENS = 8 some experts get more and run on the float32
    kernels in the same call; 2100 tokens (4200 token-expert pairs) take two int8 passes."""
    if not int8_kernels():
        pytest.skip("no int8 kernels on this path")
    monkeypatch.setattr(native, "INT8_TOKENS", int8_tokens)
    module = mixed_experts(8)
    x = torch.randn(tokens, 72)
    ids = torch.stack([torch.randperm(7)[:2] for _ in range(tokens)])  # expert 7 gets no token
    weights = torch.rand(tokens, 2).softmax(-1)
    chain = torch.zeros(tokens, 72, dtype=torch.float64)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        expert = module[e]  # an expert runs on the int8 kernels when all three of its projections can
        int8 = len(tok) <= native.INT8_TOKENS and all(native.int8_fits(getattr(expert, p)) for p in PROJECTIONS)
        h = torch.nn.functional.silu(native.packed_linear(expert.gate_proj, x[tok], int8))
        h = h * native.packed_linear(expert.up_proj, x[tok], int8)
        chain[tok] += weights[tok, slot, None].double() * native.packed_linear(expert.down_proj, h, int8).double()
    with torch.no_grad():
        fused = module(x, ids, weights)
    assert rel_err(fused, chain) < 1e-5
    assert rel_err(fused, float64_moe(module, x, ids, weights)) < 2e-2


def test_replaced_weights_rebuild_the_kernel_table(monkeypatch):
    monkeypatch.setattr(native, "INT8_TOKENS", 0)
    module = mixed_experts()
    x, ids, weights = torch.randn(2, 72), torch.tensor([[0, 1], [1, 4]]), torch.rand(2, 2)
    with torch.no_grad():
        module(x, ids, weights)
        linear = module[1].down_proj
        linear.load_packed(pack(quantize_rtn(torch.randn(linear.out_features, linear.in_features), linear.fmt)))
        assert rel_err(module(x, ids, weights), float64_moe(module, x, ids, weights)) < 1e-5


def test_huge_calls_cached_copies_and_training_use_the_torch_path():
    module = mixed_experts()
    assert not module.native_usable(torch.randn(native.MAX_TOKENS + 1, 72))
    module.set_cache_dequantized(True)  # evaluation keeps dense copies: torch matmul
    assert not module.native_usable(torch.randn(2, 72))
    assert not module.native_usable(torch.randn(2, 72, requires_grad=True))


def test_without_a_compiler_the_torch_path_runs_with_one_warning(monkeypatch, caplog, tmp_path):
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert native.library() is None and native.library() is None
    assert sum("native CPU kernels unavailable" in r.message for r in caplog.records) == 1
    assert native.kernel_name().startswith("torch (no C++ compiler")
    module = mixed_experts()
    x, ids, weights = torch.randn(3, 72), torch.tensor([[0, 1], [2, 3], [4, 0]]), torch.rand(3, 2)
    with torch.no_grad():
        assert not module.native_usable(x)
        assert rel_err(module(x, ids, weights), float64_moe(module, x, ids, weights)) < 1e-5


@pytest.mark.parametrize("tokens", [1, 6, 40])
def test_fused_forward_takes_biases_and_the_clamped_swiglu(tokens, monkeypatch):
    """GPT-OSS's experts (a bias on every projection, (clamp(up) + 1) * g * sigmoid(1.702 g) with g = min(gate, 7))
    run on the fused kernels: float64 agreement below 1e-5 with float32 activations, and the int8 kernels within
    their rounding; the inputs are large enough that the clamps act."""
    from moecompress.models.gpt_oss import ClampedSwiGLU

    torch.manual_seed(torch.seed() % 2**31)
    module = mixed_experts(8, activation=ClampedSwiGLU(1.702, 7.0), bias=True)
    x = torch.randn(tokens, 72)
    ids = torch.stack([torch.randperm(7)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2).softmax(-1)
    expected = float64_moe(module, x, ids, weights)
    with torch.no_grad():
        assert module.native_usable(x)
        gate = module[int(ids[0, 0])].gate_proj
        assert bool((native.packed_linear(gate, x).double() > 7).any())  # the gate clamp acts
        monkeypatch.setattr(native, "INT8_TOKENS", 0)
        assert rel_err(module(x, ids, weights), expected) < 1e-5
        assert rel_err(ExpertList.forward(module, x, ids, weights), expected) < 1e-5
        monkeypatch.setattr(native, "INT8_TOKENS", native.MAX_TOKENS)
        assert rel_err(module(x, ids, weights), expected) < 2e-2


def test_the_descriptor_has_the_layout_of_the_c_sources(monkeypatch):
    """common/proj_desc.h is the one declaration: the library reports its size and every field offset, and the
    ctypes mirror must agree field by field (a mirror with two fields swapped is refused)."""
    import ctypes

    native.check_layout(native.library())
    swapped = [f for f in native.ProjDesc._fields_]
    swapped[4], swapped[5] = swapped[5], swapped[4]  # out_features <-> in_features: same size, same offsets
    swapped[1], swapped[3] = swapped[3], swapped[1]  # scale <-> row_bytes: same offsets as a set, not in order
    monkeypatch.setattr(native, "ProjDesc", type("Swapped", (ctypes.Structure,), {"_fields_": swapped}))
    with pytest.raises(RuntimeError, match="ProjDesc layout"):
        native.check_layout(native.library())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 200), (64, 1024), (5, 21), (3, 16)])  # odd N; K below and off 16 and 32
@pytest.mark.parametrize("tokens", [1, 3, 4, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_gemv_matches_the_float64_product(dtype, shape, tokens, bias):
    """The native dense GEMV reads float32 and bfloat16 weights as they are and sums in float32."""
    torch.manual_seed(torch.seed() % 2**31)
    weight = torch.randn(*shape).to(dtype)
    b = torch.randn(shape[0]) if bias else None
    x = torch.randn(tokens, shape[1])
    reference = x.double() @ weight.double().T + (0 if b is None else b.double())
    assert rel_err(native.dense_linear(weight, b, x), reference) < 1e-5


def test_native_linears_equal_torch_and_fall_back_where_the_kernel_does_not_apply():
    from moecompress.runtime.native_linear import NATIVE_TOKENS, NativeLinear, use_native_linears

    torch.manual_seed(torch.seed() % 2**31)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40), torch.nn.ReLU(), torch.nn.Linear(40, 7, bias=False))
    holder = torch.nn.ModuleDict({"net": model, "embedding": torch.nn.Embedding(5, 96)})
    state = {k: v.clone() for k, v in holder.state_dict().items()}
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        expected = model(x).double()
        assert use_native_linears(holder) == 2 and isinstance(model[0], NativeLinear)
        assert all(torch.equal(holder.state_dict()[k], v) for k, v in state.items())
        assert rel_err(model(x), expected) < 1e-5
        calls = []
        real = native.dense_linear
        with pytest.MonkeyPatch.context() as m:
            m.setattr(native, "dense_linear", lambda *a: calls.append(1) or real(*a))
            model(x)
            assert len(calls) == 2  # 6 tokens: both layers native
            model(torch.randn(NATIVE_TOKENS + 1, 96))
            model.to(torch.float64)(x.double())  # not a kernel dtype
            assert len(calls) == 2
    model.float()
    y = model(x.requires_grad_())  # gradients: torch's forward
    y.sum().backward()
    assert x.grad is not None and len(calls) == 2


@pytest.mark.parametrize(
    "fmt", [IntFormat(8, 128), IntFormat(4, 128), IntFormat(4, -1, sym=True)], ids=lambda f: f.name
)
@pytest.mark.parametrize("tokens", [1, 5])
def test_quantized_linear_is_its_packed_weight_times_x(fmt, tokens):
    """A quantized non-expert linear (`dense:`) through the native GEMV: its dequantized weight and bias times x,
    to float32 rounding with float32 activations or that of the int8-rounded activations."""
    from moecompress.runtime.quantized_linear import install_quantized_linear

    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(256, 40)
    install_quantized_linear(holder, "proj", fmt, pack(quantize_rtn(holder.proj.weight.detach(), fmt)))
    q, x = holder.proj, torch.randn(tokens, 256)
    with torch.no_grad():
        y = q(x)
    int8 = q.descriptor()[1] and native.INT8_TOKENS > 0
    ref = (quantized_activations(x) if int8 else x.double()) @ q.dequantize(torch.float64).T + q.bias.double()
    assert rel_err(y, ref) < 1e-5
    assert rel_err(y, x.double() @ q.dequantize(torch.float64).T + q.bias.double()) < 2e-2
