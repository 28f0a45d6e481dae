"""Quantized non-expert linears (`dense:`): which layers are chosen, GPTQ against round-to-nearest on them, the
stage in a compress run, and the checkpoint that loads them back."""

import pytest
import torch

from moecompress import compress, load
from moecompress.errors import RecipeError
from moecompress.formats import FORMATS, unpack
from moecompress.models import get_adapter
from moecompress.quant.dense import dense_targets, quantize_linear, relative_error
from moecompress.recipe import Recipe
from moecompress.runtime.quantized_linear import QuantizedLinear

from ..conftest import CALIB, require_shared
from ..models.tiny_models import tiny_model


def test_targets_are_the_linears_outside_the_experts_and_routers():
    model = tiny_model("qwen2_moe")  # a shared expert in every MoE block
    adapter = get_adapter("qwen2_moe")
    targets = dense_targets(model, adapter, ["attention", "shared", "mlp", "lm_head"])
    assert set(targets.values()) == {"attention", "shared", "lm_head"}
    assert targets["lm_head"] == "lm_head"
    assert targets["model.layers.0.self_attn.q_proj"] == "attention"
    assert targets["model.layers.0.mlp.shared_expert.down_proj"] == "shared"
    routers = {n for v in adapter.moe_blocks(model) for n, m in model.named_modules() if m is v.router}
    assert not routers & set(targets) and not any(".experts." in n for n in targets)
    assert set(dense_targets(model, adapter, ["shared"]).values()) == {"shared"}


def test_gptq_beats_round_to_nearest_on_the_inputs_it_saw():
    w = torch.randn(96, 256)
    x = torch.randn(2048, 32) @ torch.randn(32, 256) + 0.1 * torch.randn(2048, 256)  # correlated input channels
    hessian = x.T @ x / len(x)
    fmt = FORMATS["int"].for_bits(4, 128, False)
    gptq, rtn = quantize_linear(w, fmt, hessian, 0.01), quantize_linear(w, fmt, None, 0.01)

    def output_error(packed):  # ||(W - Wq) x|| / ||W x|| over the inputs, in float64
        delta = (unpack(packed).dequantize(torch.float64) - w.double()) @ x.double().T
        return float(delta.norm() / (w.double() @ x.double().T).norm())

    assert output_error(gptq) < 0.5 * output_error(rtn)
    assert relative_error(w, gptq, hessian) == pytest.approx(output_error(gptq), rel=1e-4)


def test_bad_dense_sections_are_refused_in_one_line():
    for section, words in [({"bits": 5}, "dense.bits 5"), ({"bits": 8, "targets": ["embed"]}, "dense.targets")]:
        with pytest.raises(RecipeError, match=words):
            Recipe.from_dict({"name": "x", "dense": section})


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory, tiny_text_path):
    recipe = Recipe.from_dict(
        {
            "name": "w4-dense-w8",
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 8, "seq_len": 128},
            "quantization": {"method": "rtn", "packed_format": "Q4_K"},  # llama.cpp's, for the GGUF export
            "dense": {"bits": 8},
        }
    )
    out = tmp_path_factory.mktemp("dense") / "ckpt"
    return compress(str(tiny_text_path), recipe, output=out, progress=False, stream=False), out


def test_the_checkpoint_loads_its_quantized_linears_and_their_logits(dense_checkpoint, tiny_text_path):
    result, out = dense_checkpoint
    report = result.report.dense
    assert report["linears"] == {"attention": 16, "lm_head": 1} and report["lm_head_untied"]
    assert 8 < report["bits_per_param"] < 8.5 and max(report["mean_relative_output_error"].values()) < 0.01
    loaded = load(out)
    names = {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert names == {n for n, m in result.model.named_modules() if isinstance(m, QuantizedLinear)} and len(names) == 17
    assert not loaded.config.tie_word_embeddings
    assert loaded.config.quantization_config.format_version == 5
    ids = torch.randint(0, 8192, (1, 32))
    with torch.no_grad():
        ours, theirs = loaded(ids).logits, result.model(ids).logits
        source = load_source(tiny_text_path)(ids).logits
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-2  # bfloat16 embeddings and norms in the file
    assert float((ours - source).norm() / source.norm()) < 0.1  # w4 experts, w8 attention and head


def load_source(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_a_gguf_export_writes_the_quantized_linears_dequantized(dense_checkpoint, tmp_path):
    import gguf

    from moecompress.io.gguf_export import export_gguf

    result, out = dense_checkpoint
    export_gguf(out, tmp_path / "m.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    head = result.model.get_output_embeddings().dequantize(torch.float32)
    written = torch.from_numpy(gguf.dequantize(tensors["output.weight"].data, tensors["output.weight"].tensor_type))
    assert "token_embd.weight" in tensors and torch.allclose(written.float().view_as(head), head, rtol=1e-3, atol=1e-3)
