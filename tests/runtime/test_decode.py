"""The compiled decode step (runtime/decode.py): the native kernels as custom ops, a static KV cache, greedy tokens."""

import pytest
import torch

from moecompress import load
from moecompress.runtime import native
from moecompress.runtime.decode import Decoder, compiled_path_refusal, dense_linear_op, packed_experts_op

from .test_native import float64_moe, mixed_experts, rel_err

pytestmark = pytest.mark.skipif(native.library() is None, reason="no native kernels (no C++ compiler)")


def test_the_experts_op_is_the_fused_forward(monkeypatch):
    monkeypatch.setattr(native, "INT8_TOKENS", 0)  # float32 activations: exact
    module = mixed_experts()
    x, ids, weights = torch.randn(3, 72), torch.stack([torch.randperm(6)[:2] for _ in range(3)]), torch.rand(3, 2)
    with torch.no_grad():
        y = packed_experts_op(module.registry_key, x, ids, weights)
    assert rel_err(y, float64_moe(module, x, ids, weights)) < 1e-5
    torch.library.opcheck(
        packed_experts_op, (module.registry_key, x, ids, weights), test_utils=("test_schema", "test_faketensor")
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dense_op_is_the_linear(dtype):
    w, b, x = torch.randn(40, 72).to(dtype), torch.randn(40), torch.randn(1, 2, 72)
    y = dense_linear_op(w, b, x)
    assert y.shape == (1, 2, 40) and rel_err(y, x.double() @ w.double().T + b.double()) < 1e-5
    torch.library.opcheck(dense_linear_op, (w, b, x), test_utils=("test_schema", "test_faketensor"))


def test_models_the_compiled_path_cannot_take_say_why(compressed_tiny_text, monkeypatch):
    _, path = compressed_tiny_text
    model = load(path)
    assert compiled_path_refusal(model) is None
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", "MOECOMPRESS_KERNELS=torch")
    decoder = Decoder(model)
    assert not decoder.compiled and decoder.fallback.startswith("the native kernels are unavailable (torch (")


@pytest.mark.slow
def test_compiled_greedy_tokens_are_the_eager_ones(compressed_tiny_text, tmp_path, monkeypatch):
    """The whole decode step compiled (one graph, the experts and dense linears as custom ops) gives the tokens of
    transformers' own generate on the same checkpoint, and a second generate reuses the compiled graph."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    _, path = compressed_tiny_text
    model = load(path)
    prompt = torch.randint(1, 8192, (1, 24))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, 24:].tolist()
    torch._dynamo.reset()
    decoder = Decoder(model, max_len=64)
    tokens, stats = decoder.generate(prompt, 24)
    again, second = decoder.generate(prompt, 24)
    assert decoder.compiled and tokens == expected and again == expected
    assert stats.compile_s > 5 * second.compile_s  # the second call does not compile again

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_models_the_static_cache_does_not_fit_decode_through_transformers_generate():
    """GPT-OSS's sliding-window layers (and caches transformers' static one cannot hold) take transformers' own
    generate: the same tokens, and the path says why."""
    from ..models.tiny_models import tiny_model

    model = tiny_model("gpt_oss").eval()
    prompt = torch.randint(3, 110, (1, 12))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 12:].tolist()
    decoder = Decoder(model, compile=False)
    tokens, stats = decoder.generate(prompt, 8)
    assert tokens == expected and not decoder.static
    assert stats.path == "transformers' generate (its cache has sliding-window or chunked layers)"


def test_generate_prints_the_text_and_refuses_a_prompt_too_long(compressed_tiny_text, capsys):
    import json

    from moecompress.cli import main

    ckpt = str(compressed_tiny_text[1])
    assert main(["generate", ckpt, "--prompt", "def add(a, b):", "--max-new-tokens", "6", "--eager"]) == 0
    result = json.loads(capsys.readouterr().out)["result"]
    assert len(result["tokens"]) == 6 and result["text"] and result["path"] == "eager (compile=False)"
    assert main(["generate", ckpt, "--prompt", "x", "--max-new-tokens", "100000", "--eager"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: a prompt of 1 tokens and 100000 new ones exceed the 2048 positions")


def test_the_quantized_linear_op_is_its_native_forward():
    from moecompress.formats import IntFormat, pack
    from moecompress.quant.rtn import quantize_rtn
    from moecompress.runtime.decode import quantized_linear_op
    from moecompress.runtime.quantized_linear import install_quantized_linear

    holder, fmt = torch.nn.Module(), IntFormat(4, 128)
    holder.proj = torch.nn.Linear(256, 48)
    install_quantized_linear(holder, "proj", fmt, pack(quantize_rtn(holder.proj.weight.detach(), fmt)))
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = quantized_linear_op(holder.proj, x)
    assert torch.equal(y, holder.proj.native_forward(x))
    assert rel_err(y, x.double() @ holder.proj.dequantize(torch.float64).T + holder.proj.bias.double()) < 2e-2
    op = torch.ops.moecompress.quantized_linear.default
    torch.library.opcheck(op, (holder.proj.registry_key, x), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compiled_tokens_with_quantized_linears_are_the_eager_ones(tmp_path, tiny_text_path, monkeypatch):
    """Attention and LM head quantized (`dense:`): their native GEMV as custom ops in the graph, same greedy tokens
    as the eager step over the same checkpoint."""
    from moecompress import compress
    from moecompress.recipe import Recipe

    from ..conftest import CALIB

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    calibration = {"dataset": str(CALIB), "num_samples": 4, "seq_len": 64}
    recipe = {"name": "d4", "calibration": calibration, "quantization": {"method": "rtn"}, "dense": {"bits": 4}}
    compress(str(tiny_text_path), Recipe.from_dict(recipe), output=tmp_path / "d4", progress=False)
    model = load(tmp_path / "d4")
    prompt = torch.randint(1, 8192, (1, 16))
    torch._dynamo.reset()
    compiled, eager = Decoder(model, max_len=64), Decoder(model, max_len=64, compile=False)
    tokens, stats = compiled.generate(prompt, 24)
    assert compiled.compiled and tokens == eager.generate(prompt, 24)[0]
