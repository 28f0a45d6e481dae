import json

import pytest
import torch

import moecompress
from moecompress.evaluation.efficiency import measure_efficiency, parameter_budget
from moecompress.evaluation.records import read_record
from moecompress.models import get_adapter


def test_compress_writes_a_run_record(compressed_tiny_text):
    result, out = compressed_tiny_text
    record = read_record(out)
    assert record.recipe == "test-w4" and record.method == "gptq w4g128asym"
    assert record.expert_bits_per_param == pytest.approx(4 + 24 / 128)
    bits = torch.tensor(record.bit_allocation["values"])
    assert bits.shape == (4, 16) and bool((bits == 4).all())
    shares = torch.tensor(record.importance["values"])
    assert torch.allclose(shares.sum(1), torch.ones(4))
    assert record.compression["expert_bytes"] == result.report.expert_bytes


def test_parameter_budget_counts_packed_experts_and_active_parameters(compressed_tiny_text):
    _, out = compressed_tiny_text
    model = moecompress.load(out)
    config = json.loads((out / "config.json").read_text())
    experts, top_k, layers = config["num_local_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]
    expert_params = layers * experts * 3 * config["hidden_size"] * config["moe_intermediate_size"]
    budget = parameter_budget(model, get_adapter("qwen3_moe"), itemsize=2)
    assert budget["expert_params"] == expert_params
    assert budget["expert_bits_per_param"] == pytest.approx(4 + 24 / 128)
    dense = budget["total_params"] - expert_params
    assert budget["active_params_per_token"] == pytest.approx(dense + expert_params * top_k / experts)
    assert budget["expert_activation_ratio"] == pytest.approx(top_k / experts)
    half = parameter_budget(model, get_adapter("qwen3_moe"), itemsize=2, skipped=0.5)
    assert half["active_params_per_token"] == pytest.approx(dense + expert_params * top_k / experts / 2)


def test_measure_efficiency_reads_the_folder_and_times_both_phases(compressed_tiny_text):
    _, out = compressed_tiny_text
    model = moecompress.load(out)
    tokens = torch.randint(0, 8000, (200,))
    result = measure_efficiency(
        model, get_adapter("qwen3_moe"), out, tokens, load_seconds=0.5, prefill_len=64, decode_tokens=4, repeats=1,
        compile_decode=False,
    )  # fmt: skip
    assert result.checkpoint_bytes == (out / "model.safetensors").stat().st_size
    assert result.bits_per_param == pytest.approx(8 * result.checkpoint_bytes / result.total_params)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0 and result.expert_activations_skipped == 0
    assert result.decode_path == "eager (compile=False)" and result.compile_seconds == 0 < result.first_token_seconds


def test_a_loaded_checkpoint_decodes_through_native_linears_as_through_torch(compressed_tiny_text):
    from moecompress.runtime import native
    from moecompress.runtime.native_linear import NativeLinear

    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.kernel_name()}")
    _, out = compressed_tiny_text
    fast, plain = moecompress.load(out), moecompress.load(out, dense_kernels=False)
    assert isinstance(fast.model.layers[0].self_attn.q_proj, NativeLinear)
    assert not any(isinstance(m, NativeLinear) for m in plain.modules())
    prompt = torch.randint(0, 8000, (1, 12))
    with torch.no_grad():
        logits = fast(prompt[:, :3]).logits.double()  # 3 tokens: every linear native
        assert float((logits - plain(prompt[:, :3]).logits).norm() / logits.norm()) < 1e-5
    a = fast.generate(prompt, max_new_tokens=8, do_sample=False)
    b = plain.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)
    result = measure_efficiency(
        fast, get_adapter("qwen3_moe"), out, torch.randint(0, 8000, (40,)), prefill_len=16, decode_tokens=2, repeats=1,
        compile_decode=False,
    )  # fmt: skip
    assert result.dense_kernels.startswith("native-") and "dense GEMV" in result.dense_kernels
