"""GGUF export (io/gguf_export.py): our codes in llama.cpp's file, read back with llama.cpp's own `gguf` package."""

import json
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

from moecompress import compress, load  # noqa: E402
from moecompress.cli import main  # noqa: E402
from moecompress.errors import CheckpointError  # noqa: E402
from moecompress.io.gguf_export import export_gguf  # noqa: E402
from moecompress.recipe import Recipe  # noqa: E402

from ..conftest import CALIB, TINY_TEXT, TINY_VL, require_shared  # noqa: E402


@pytest.fixture(scope="module")
def q4k_tiny_text(tmp_path_factory):
    recipe = Recipe.from_dict(
        {
            "name": "test-q4k",
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 8, "seq_len": 256},
            "quantization": {"packed_format": "Q4_K", "bits": 4},
            "gguf": {"default_type": "F16", "tensor_types": {"attn_v": "Q8_0"}},
        }
    )
    out = tmp_path_factory.mktemp("ckpt") / "tiny-q4k"
    compress(str(require_shared(TINY_TEXT)), recipe, output=out, progress=False)
    return out


def llama_cpp_vs(model, path, tokens: int, per_token: bool = False):
    """Relative error of llama.cpp's logits for the GGUF `path` against `model`'s on random tokens (`per_token`: each
    position's); skips where llama-cpp-python (the optional extra [gguf], not in the test command) has no loadable
    library."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # installed without its library (LLAMA_CPP_LIB_PATH unset): OSError
        pytest.skip(f"llama-cpp-python is not usable here: {exc}")
    ids = torch.randint(1, 8192, (tokens,)).tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2 * tokens, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[:tokens]), dtype=torch.float64)
    llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double()
    if per_token:
        return (theirs - ours).norm(dim=-1) / ours.norm(dim=-1)
    return float((theirs - ours).norm() / ours.norm())


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    return reader, {t.name: t for t in reader.tensors}, fields


def test_the_experts_go_to_llama_cpp_as_the_codes_we_chose(q4k_tiny_text, tmp_path):
    result = export_gguf(q4k_tiny_text, tmp_path / "tiny.gguf")
    reader, tensors, fields = read(tmp_path / "tiny.gguf")
    model = load(q4k_tiny_text)
    for layer in range(4):
        experts = model.model.layers[layer].mlp.experts
        for proj, kind in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            t = tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
            stored = torch.stack([getattr(experts[e], proj).weight_packed for e in range(16)]).numpy()
            assert t.tensor_type.name == "Q4_K" and np.array_equal(t.data, stored)
            ours = torch.stack([getattr(experts[e], proj).dequantize() for e in range(16)]).numpy()
            assert np.array_equal(dequantize(t.data, t.tensor_type).view(np.uint32), ours.view(np.uint32))
    assert fields["general.architecture"] == "qwen3moe"
    assert (fields["qwen3moe.expert_count"], fields["qwen3moe.expert_used_count"]) == (16, 2)
    assert fields["qwen3moe.expert_feed_forward_length"] == 256
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 8192
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    assert kinds["blk.0.attn_v.weight"] == "Q8_0" and kinds["blk.0.attn_q.weight"] == "F16"  # the recipe's gguf types
    assert kinds["blk.0.attn_norm.weight"] == kinds["blk.0.ffn_gate_inp.weight"] == "F32"
    assert "output.weight" not in kinds  # tied: llama.cpp reads token_embd
    assert result["bits_per_expert_weight"] == 4.5


def test_a_source_model_exports_whole_in_the_type_asked(tmp_path):
    source = require_shared(TINY_TEXT)
    export_gguf(source, tmp_path / "f16.gguf", "F16")
    _, tensors, _ = read(tmp_path / "f16.gguf")
    from safetensors.torch import load_file

    weights = load_file(source / "model.safetensors")
    q = weights["model.layers.1.self_attn.q_proj.weight"].to(torch.float16).numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight"].data, q)
    up = torch.stack([weights[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] for e in range(16)])
    assert np.array_equal(tensors["blk.1.ffn_up_exps.weight"].data, up.to(torch.float16).numpy())


def cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err.strip().splitlines()[-1]


def test_what_llama_cpp_cannot_hold_is_refused_in_one_line(compressed_tiny_text, tmp_path, capsys):
    _, int_checkpoint = compressed_tiny_text
    target = tmp_path / "x.gguf"
    rc, err = cli(capsys, "export", str(int_checkpoint), "--format", "gguf", "-o", str(target))
    assert rc == 2 and err.startswith("error: GGUF export: the experts are w4g128asym, not a llama.cpp type")
    rc, err = cli(
        capsys, "export", str(require_shared(TINY_VL)), "--format", "gguf", "--type", "F16", "-o", str(target)
    )
    assert rc == 2 and err.startswith("error: GGUF export: model type 'qwen3_vl_moe' has no llama.cpp architecture")
    rc, err = cli(capsys, "export", str(require_shared(TINY_TEXT)), "--format", "gguf", "-o", str(target))
    assert rc == 2 and "pass --type F16" in err
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_row_a_type_cannot_hold_is_refused_before_compressing(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=512, hidden_size=96, intermediate_size=128, num_hidden_layers=1, head_dim=32,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "h96")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(require_shared(TINY_TEXT) / name, tmp_path / "h96")
    recipe = tmp_path / "q4k.yaml"
    recipe.write_text(
        json.dumps(
            {
                "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 2},
                "quantization": {"packed_format": "Q4_K"},
            }
        )
    )
    rc, err = cli(capsys, "compress", str(tmp_path / "h96"), "--recipe", str(recipe), "-o", str(tmp_path / "out"))
    assert rc == 2 and err.startswith("error: layer 0's experts") and "blocks of 256 weights; a row of 96" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out*"))


def test_a_per_expert_mix_is_refused_with_the_reason(q4k_tiny_text):
    from moecompress.formats.ggml import GGMLFormat
    from moecompress.io.gguf_export import _expert_tensors
    from moecompress.models import get_adapter
    from moecompress.runtime.packed_experts import PackedLinear

    model = load(q4k_tiny_text)
    experts = model.model.layers[2].mlp.experts
    experts[5].gate_proj = PackedLinear(256, 256, GGMLFormat.of_type("Q3_K"))
    with pytest.raises(CheckpointError, match="one tensor of one type; compress with allocation.granularity: layer"):
        _expert_tensors(model, get_adapter("qwen3_moe"), True, None)
    with pytest.raises(Exception, match="granularity expert: llama.cpp stores a layer's experts as one tensor"):
        Recipe.from_dict(
            {
                "quantization": {"packed_format": "Q2_K", "bits": 2},
                "allocation": {"method": "lp", "candidates": [2, 3], "avg_bits": 2.2},
            }
        )


def test_llama_cpp_runs_the_export_like_our_runtime(q4k_tiny_text, tmp_path):
    export_gguf(q4k_tiny_text, tmp_path / "tiny.gguf")
    # llama.cpp rounds activations to 8 bits for its quantized dot products: about 1 % of the logits
    assert llama_cpp_vs(load(q4k_tiny_text), tmp_path / "tiny.gguf", 64) < 0.03


def test_ternary_experts_export_as_tq_blocks(tmp_path):
    recipe = Recipe.from_dict(
        {
            "name": "test-ternary",
            "calibration": {"dataset": str(require_shared(CALIB)), "num_samples": 4, "seq_len": 128},
            "quantization": {"ternary": True, "group_size": -1},
            "gguf": {"ternary_type": "TQ2_0"},
        }
    )
    out = tmp_path / "tiny-ternary"
    compress(str(require_shared(TINY_TEXT)), recipe, output=out, progress=False)
    result = export_gguf(out, tmp_path / "t.gguf")
    _, tensors, _ = read(tmp_path / "t.gguf")
    down = tensors["blk.3.ffn_down_exps.weight"]
    experts = load(out).model.layers[3].mlp.experts
    ours = torch.stack([experts[e].down_proj.dequantize() for e in range(16)]).numpy()
    assert down.tensor_type.name == "TQ2_0"
    assert np.array_equal(dequantize(down.data, down.tensor_type).view(np.uint32), ours.view(np.uint32))
    assert result["bits_per_expert_weight"] == 2.0625


MLA = {  # DeepSeek's attention and routing: the cache compressed to kv_lora_rank, a leading dense layer, shared experts
    **{"kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "v_head_dim": 64, "num_key_value_heads": 4},
    **{"n_routed_experts": 4, "n_shared_experts": 1, "moe_intermediate_size": 256, "first_k_dense_replace": 1},
}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
YARN.update(beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)  # gpt-oss ignores the mscales
TINY_ARCHS = {  # model type: (config overrides, llama.cpp architecture)
    "qwen3_moe": ({"num_experts": 4, "moe_intermediate_size": 256, "head_dim": 64, "norm_topk_prob": True}, "qwen3moe"),
    "qwen2_moe": ({"num_experts": 4, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512}, "qwen2moe"),
    "olmoe": ({"num_experts": 4, "num_key_value_heads": 4}, "olmoe"),  # llama.cpp's olmoe has no GQA
    "mixtral": ({"num_local_experts": 4}, "llama"),
    "glm4_moe": (
        {
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "moe_intermediate_size": 256,
            "first_k_dense_replace": 1,
            "head_dim": 64,
            "n_group": 1,
            "topk_group": 1,
        },
        "glm4moe",
    ),  # fmt: skip
    "deepseek_v3": ({**MLA, "q_lora_rank": 64, "n_group": 2, "topk_group": 1, "rope_parameters": YARN}, "deepseek2"),
    "deepseek_v2": ({**MLA, "q_lora_rank": 64, "routed_scaling_factor": 2.0}, "deepseek2"),
    "gpt_oss": (  # llama.cpp always rounds yarn's correction range: truncate False (gpt-oss's own) gives 2.5e-3 here
        {"num_local_experts": 4, "head_dim": 64, "sliding_window": 16, "rope_parameters": {**YARN, "truncate": True}},
        "gpt-oss",
    ),
}


def tiny_model(model_type: str, folder):
    """A random-weight 2-layer model of `model_type` with moe-tiny-text's tokenizer (biases and sinks made nonzero)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides, _ = TINY_ARCHS[model_type]
    base = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
    base.update(num_key_value_heads=2, max_position_embeddings=512, num_experts_per_tok=2, eos_token_id=0)
    config = AutoConfig.for_model(model_type, **{**base, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("correction_bias", "bias", "sinks")):
                tensor.copy_(0.5 * torch.randn_like(tensor))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(require_shared(TINY_TEXT) / name, folder)
    return model.eval()


@pytest.mark.parametrize("model_type", list(TINY_ARCHS))
def test_every_mapped_architecture_exports_every_tensor(model_type, tmp_path):
    model = tiny_model(model_type, tmp_path / model_type)
    export_gguf(tmp_path / model_type, tmp_path / "m.gguf", "F32")
    _, tensors, fields = read(tmp_path / "m.gguf")
    assert fields["general.architecture"] == TINY_ARCHS[model_type][1]
    floats = sum(p.numel() for p in model.state_dict().values()) - model.config.tie_word_embeddings * 8192 * 256
    assert sum(int(np.prod(t.shape)) for t in tensors.values()) == floats
    assert {f"blk.1.ffn_{k}_exps.weight" for k in ("gate", "up", "down")} <= set(tensors)


@pytest.mark.parametrize("model_type", list(TINY_ARCHS))
def test_llama_cpp_runs_every_mapped_architecture_like_transformers(model_type, tmp_path):
    model = tiny_model(model_type, tmp_path / model_type)
    export_gguf(tmp_path / model_type, tmp_path / "m.gguf", "F32")
    errors = llama_cpp_vs(model, tmp_path / "m.gguf", 48, per_token=True)
    # random routers have near-ties that float rounding flips: one position of 48 may take other experts (qwen3_moe
    # on an AVX2 CPU: 0.11 at one position, 2.4e-4 to 4.4e-4 at the others); a wrong mapping misses at every one
    assert int((errors > 3e-3).sum()) <= 1 and float(errors.median()) < 1e-3


def test_routing_llama_cpp_would_compute_otherwise_is_refused(tmp_path):
    model = tiny_model("qwen3_moe", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    with pytest.raises(CheckpointError, match="norm_topk_prob=False, but llama.cpp always renormalizes"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "F16")
    assert model is not None and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(
    "model_type,change,why",
    [
        ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, "by the sum of their"),
        ("deepseek_v2", {"q_lora_rank": None}, "only at 26 or 27 layers"),
        ("deepseek_v3", {"rope_interleave": False}, "rotates DeepSeek's rope dimensions as adjacent pairs"),
        ("gpt_oss", {"swiglu_limit": 9.0}, "limit 9.0, but llama.cpp's are 1.702 and 7.0"),
    ],
)
def test_configs_llama_cpp_would_run_otherwise_are_refused(model_type, change, why, tmp_path):
    tiny_model(model_type, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=why):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "F16")
    assert not (tmp_path / "m.gguf").exists()


def test_mla_is_split_as_llama_cpp_absorbs_it(tmp_path):
    model = tiny_model("deepseek_v3", tmp_path / "m")
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", "F32")
    _, tensors, fields = read(tmp_path / "m.gguf")
    k_b, v_b = tensors["blk.0.attn_k_b.weight"].data, tensors["blk.0.attn_v_b.weight"].data
    assert k_b.shape == (4, 64, 32) and v_b.shape == (4, 64, 64)  # [heads, rank, nope], [heads, v, rank]
    kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(384, 64)
    assert np.array_equal(kv_b, model.model.layers[0].self_attn.kv_b_proj.weight.detach().numpy())
    assert (fields["deepseek2.attention.head_count_kv"], fields["deepseek2.attention.key_length"]) == (1, 96)
    assert fields["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    assert fields["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)  # llama.cpp divides by 0.1 again
    assert (fields["deepseek2.expert_group_count"], fields["deepseek2.leading_dense_block_count"]) == (2, 1)


@pytest.mark.parametrize("model_type", ["gpt_oss", "deepseek_v3"])
def test_a_compressed_checkpoint_of_every_routing_exports(model_type, tmp_path):
    tiny_model(model_type, tmp_path / "m")
    recipe = Recipe.from_dict(
        {"name": "q4k-rtn", "quantization": {"method": "rtn", "packed_format": "Q4_K"}, "gguf": {"default_type": "F32"}}
    )
    compress(str(tmp_path / "m"), recipe, output=tmp_path / "q", progress=False)
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    _, tensors, _ = read(tmp_path / "q.gguf")
    model = load(tmp_path / "q")
    experts = model.model.layers[1].mlp.experts
    if model_type == "gpt_oss":  # the experts' biases, F32 [experts, out]
        ours = torch.stack([experts[e].up_proj.bias for e in range(4)]).float().numpy()
        assert np.array_equal(tensors["blk.1.ffn_up_exps.bias"].data, ours) and np.abs(ours).sum() > 0
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type.name == "Q4_K"
    assert llama_cpp_vs(model, tmp_path / "q.gguf", 48) < 0.03
    export_gguf(tmp_path / "q", tmp_path / "q4.gguf", "Q4_K")  # rows of 32 or 64 (DeepSeek's k_b, v_b): Q8_0
    kinds = {name: t.tensor_type.name for name, t in read(tmp_path / "q4.gguf")[1].items()}
    assert kinds["blk.0.attn_output.weight"] == "Q4_K"
    assert model_type != "deepseek_v3" or kinds["blk.0.attn_k_b.weight"] == kinds["blk.0.attn_v_b.weight"] == "Q8_0"
