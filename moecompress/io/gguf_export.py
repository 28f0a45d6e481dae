"""Export to GGUF, llama.cpp's file format (llama.cpp, Ollama, LM Studio), through llama.cpp's own `gguf` package:
its writer, architecture names, tensor name maps, metadata keys, vocabulary helpers and quant-type constants.

A moecompress checkpoint whose experts are llama.cpp types (recipes with `packed_format: Q4_K` ...) is written
with the experts' block bytes as they are: llama.cpp runs the codes GPTQ chose, not a re-rounding. Every other
tensor gets the type the checkpoint's recipe names in its `gguf:` section (or `--type`): F16 by default, norms and
routers F32 as llama.cpp's converter keeps them. A source model (no moecompress manifest) is written whole in
`--type` (F16: what llama.cpp's own quantizer starts from)."""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, RecipeError
from ..formats import FORMATS, TERNARY, expand_scales, unpack
from ..formats.ggml import GGML_TYPES
from ..formats.ggml_blocks import TERNARY_TYPES, pack_ternary
from ..models.base import PROJECTIONS
from ..storage.outputs import MANIFEST, check_file_output, disk_errors

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names one of our model types: its architecture, the hyperparameters beyond (or instead of) the
    common ones (writer method, and the config keys tried in order or a function of the config: None writes
    nothing), how a source tensor becomes llama.cpp's, and what in a config llama.cpp would compute otherwise."""

    arch: str  # gguf.MODEL_ARCH member
    extra: tuple[tuple[str, tuple[str, ...] | Callable], ...] = ()
    rewrite: Callable | None = None  # (name, tensor, config) -> [(name, tensor)]
    check: Callable | None = None  # config -> why llama.cpp would run another model, or None


def _norm_topk(expected: bool) -> Callable:
    def check(config) -> str | None:
        norm = getattr(config, "norm_topk_prob", None)
        if norm is not None and bool(norm) != expected:
            return f"norm_topk_prob={norm}, but llama.cpp always {'renormalizes' if expected else 'keeps'} the top-k weights"
        return None

    return check


def _interleave_rope(name: str, w: torch.Tensor, config) -> list:
    """HF rotates the two halves of each head, llama.cpp's llama graph adjacent pairs: reorder q's and k's rows."""
    if not re.search(r"self_attn\.[qk]_proj\.weight$", name):
        return [(name, w)]
    heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
    return [(name, w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))]


def _split_kv_b(name: str, w: torch.Tensor, config) -> list:
    """DeepSeek's MLA as llama.cpp absorbs it: kv_b_proj [heads * (nope + v), rank] -> k_b [heads, rank, nope]
    (each head's block transposed) and v_b [heads, v, rank]."""
    if not name.endswith("kv_b_proj.weight"):
        return [(name, w)]
    nope, v = config.qk_nope_head_dim, config.v_head_dim
    k_b, v_b = w.reshape(config.num_attention_heads, nope + v, -1).split([nope, v], dim=1)
    return [(name.replace("kv_b", "k_b"), k_b.transpose(1, 2).contiguous()), (name.replace("kv_b", "v_b"), v_b)]


def _deepseek_check(config) -> str | None:
    if getattr(config, "rope_interleave", True) is False:
        return "rope_interleave=False, but llama.cpp rotates DeepSeek's rope dimensions as adjacent pairs"
    groups, used = getattr(config, "n_group", None) or 1, getattr(config, "topk_group", None) or 1
    if config.model_type == "deepseek_v2" and getattr(config, "topk_method", "greedy") != "greedy" and used < groups:
        return "group-limited routing ranks groups by their best expert, but llama.cpp by the sum of their top two"
    if config.q_lora_rank is None and config.num_hidden_layers not in (26, 27):
        return "no q_lora_rank, which llama.cpp's deepseek2 reads as such only at 26 or 27 layers (V2-Lite)"
    return _norm_topk(config.model_type == "deepseek_v3")(config)


def _gpt_oss_check(config) -> str | None:
    if (config.swiglu_alpha, config.swiglu_limit) != (1.702, 7.0):
        return f"swiglu alpha {config.swiglu_alpha}, limit {config.swiglu_limit}, but llama.cpp's are 1.702 and 7.0"
    if config.layer_types != ["sliding_attention", "full_attention"] * (config.num_hidden_layers // 2):
        return "its layers do not alternate sliding and full attention from the first, as llama.cpp's gpt-oss does"
    return None


MLA = (
    ("add_head_count_kv", lambda c: 1),  # llama.cpp runs MLA as MQA over the compressed cache
    ("add_kv_lora_rank", ("kv_lora_rank",)),
    ("add_q_lora_rank", ("q_lora_rank",)),
    ("add_key_length", lambda c: c.kv_lora_rank + c.qk_rope_head_dim),
    ("add_value_length", ("kv_lora_rank",)),
    ("add_key_length_mla", lambda c: c.qk_nope_head_dim + c.qk_rope_head_dim),
    ("add_value_length_mla", ("v_head_dim",)),
    ("add_rope_dimension_count", ("qk_rope_head_dim",)),
    ("add_vocab_size", ("vocab_size",)),
    ("add_expert_feed_forward_length", ("moe_intermediate_size",)),
    ("add_expert_shared_count", ("n_shared_experts",)),
    ("add_leading_dense_block_count", ("first_k_dense_replace",)),
    ("add_expert_weights_scale", ("routed_scaling_factor",)),
    ("add_expert_weights_norm", lambda c: getattr(c, "norm_topk_prob", None) or None),
    ("add_expert_group_count", ("n_group",)),
    ("add_expert_group_used_count", ("topk_group",)),
    # llama.cpp's deepseek2 reads 0.1 * mscale_all_dim here (its converter's legacy convention)
    ("add_rope_scaling_yarn_log_mul", lambda c: 0.1 * c.rope_parameters["mscale_all_dim"] if _mscale(c) else None),
)


def _mscale(config) -> bool:
    return (getattr(config, "rope_parameters", None) or {}).get("mscale_all_dim") is not None


def _gating(kind: str) -> tuple[str, Callable]:
    return ("add_expert_gating_func", lambda c: getattr(_gguf().ExpertGatingFuncType, kind))


ARCHS = {
    "qwen3_moe": GGUFArch(
        "QWEN3MOE", (("add_expert_feed_forward_length", ("moe_intermediate_size",)),), check=_norm_topk(True)
    ),
    "qwen2_moe": GGUFArch(
        "QWEN2MOE",
        (
            ("add_expert_feed_forward_length", ("moe_intermediate_size",)),
            ("add_expert_shared_feed_forward_length", ("shared_expert_intermediate_size",)),
        ),
        check=_norm_topk(False),
    ),
    "olmoe": GGUFArch("OLMOE", check=_norm_topk(False)),
    "mixtral": GGUFArch("LLAMA", rewrite=_interleave_rope),
    "glm4_moe": GGUFArch(
        "GLM4_MOE",
        (
            ("add_expert_feed_forward_length", ("moe_intermediate_size",)),
            ("add_expert_shared_count", ("n_shared_experts",)),
            ("add_leading_dense_block_count", ("first_k_dense_replace",)),
            ("add_expert_weights_scale", ("routed_scaling_factor",)),
            ("add_expert_weights_norm", ("norm_topk_prob",)),
            _gating("SIGMOID"),
            ("add_rope_dimension_count", lambda c: int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1))),
        ),
    ),
    "deepseek_v2": GGUFArch("DEEPSEEK2", (*MLA, _gating("SOFTMAX")), _split_kv_b, _deepseek_check),
    "deepseek_v3": GGUFArch("DEEPSEEK2", (*MLA, _gating("SIGMOID")), _split_kv_b, _deepseek_check),
    "gpt_oss": GGUFArch(
        "GPT_OSS",
        (("add_sliding_window", ("sliding_window",)), ("add_expert_feed_forward_length", ("intermediate_size",))),
        check=_gpt_oss_check,
    ),
}
COMMON = (
    ("add_context_length", ("max_position_embeddings",)),
    ("add_embedding_length", ("hidden_size",)),
    ("add_feed_forward_length", ("intermediate_size",)),
    ("add_head_count", ("num_attention_heads",)),
    ("add_head_count_kv", ("num_key_value_heads",)),
    ("add_layer_norm_rms_eps", ("rms_norm_eps",)),
    ("add_expert_count", ("num_local_experts", "num_experts", "n_routed_experts")),
    ("add_expert_used_count", ("num_experts_per_tok",)),
    ("add_key_length", ("head_dim",)),
    ("add_value_length", ("head_dim",)),
)
# The Split regexes of byte-level BPE pre-tokenizers (CR and LF escaped) -> llama.cpp's pre-tokenizer name
PRE_TOKENIZERS = {
    (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
        "\\s+(?!\\S)|\\s+",
    ): "qwen2",
    (
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
        "\\s+(?!\\S)|\\s+",
    ): "llama-bpe",
    (
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ): "deepseek-v3",
    (
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
        "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ): "gpt-4o",
}


def _gguf():
    import gguf

    return gguf


def supported() -> list[str]:
    return sorted(ARCHS)


def export_gguf(
    source: str | Path,
    output: str | Path,
    tensor_type: str | None = None,
    overwrite: bool = False,
    ternary_type: str | None = None,
) -> dict:
    """Write `source` (a moecompress checkpoint, or a source model with `tensor_type`) as the GGUF file `output`;
    `tensor_type` / `ternary_type` override the recipe's types of the non-expert tensors / ternary experts. Returns
    what was written (architecture, bits per weight)."""
    import gguf

    folder = Path(source).expanduser()
    checkpoint = (folder / MANIFEST).is_file()
    out = _check_output(output, overwrite)
    arch = _arch(_model_type(folder))
    types, recipe_ternary = _non_expert_types(folder, checkpoint, tensor_type)
    ternary_type = ternary_type or recipe_ternary
    if ternary_type not in TERNARY_TYPES:
        raise RecipeError(f"ternary type '{ternary_type}': use one of {list(TERNARY_TYPES)}")
    model, adapter = _load(folder, checkpoint, tensor_type)
    config = model.config
    _check_config(arch, config)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it plans at INFO
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch.arch)])
    stats = {"expert": [0, 0], "all": [0, 0]}  # [bits, weights]
    try:
        _metadata(writer, config, arch, folder)
        experts = _expert_tensors(model, adapter, checkpoint, tensor_type if not checkpoint else ternary_type)
        _add_plain(writer, model, arch, types, {prefix for prefix, _ in experts}, stats)
        for _, tensors in experts:
            for gguf_name, data, qtype, numel in tensors:
                _add_raw(writer, gguf_name, data, qtype, numel, stats, expert=not gguf_name.endswith(".bias"))
        with disk_errors(f"the GGUF file {out}"):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=True)
            writer.close()
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    bits = {k: v[0] / max(v[1], 1) for k, v in stats.items()}
    return {
        "output": str(out),
        "arch": arch.arch.lower(),
        "bits_per_expert_weight": bits["expert"],
        "bits_per_weight": bits["all"],
    }


def _check_output(output: str | Path, overwrite: bool) -> Path:
    out = check_file_output(output, "--output")
    if out.suffix != ".gguf":
        raise RecipeError(f"--output '{output}': name a .gguf file, e.g. {out.with_suffix('.gguf').name}.")
    if out.exists() and not overwrite:
        raise RecipeError(f"'{output}' exists; pass --overwrite to replace it.")
    return out


def _model_type(folder: Path) -> str:
    import json

    try:
        return json.loads((folder / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"'{folder}' has no readable config.json with a model_type: {exc}") from None


def _arch(model_type: str) -> GGUFArch:
    if model_type not in ARCHS:
        raise CheckpointError(
            f"GGUF export: model type '{model_type}' has no llama.cpp architecture mapped here (mapped: "
            f"{', '.join(supported())}); export it with --format compressed-tensors or gptq instead."
        )
    return ARCHS[model_type]


def _load(folder: Path, checkpoint: bool, tensor_type: str | None):
    from ..models import get_adapter

    if checkpoint:
        from .loader import load

        model = load(folder, dense_kernels=False)
    else:
        from ..models.loading import load_model

        if tensor_type is None:
            raise RecipeError(
                f"'{folder}' is a source model, not a moecompress checkpoint: pass --type F16 (or F32, BF16, Q8_0 ...) "
                "to write it whole in that type."
            )
        model = load_model(str(folder)).model
    return model, get_adapter(model.config.model_type)


def _check_config(arch: GGUFArch, config) -> None:
    why = arch.check(config) if arch.check is not None else None
    if why is not None:
        raise CheckpointError(
            f"GGUF export: this {config.model_type} has {why}: llama.cpp's {arch.arch.lower()} would run another "
            "model. Export it with --format compressed-tensors or gptq instead."
        )


def _non_expert_types(folder: Path, checkpoint: bool, tensor_type: str | None) -> tuple[dict[str, str], str]:
    """({regex on GGUF tensor name: type}, the first match winning and "" matching all: the default; the ternary
    experts' type), from the checkpoint recipe's gguf section and `tensor_type`."""
    types, section = {}, {}
    if checkpoint and (folder / "recipe.yaml").is_file():
        import yaml

        section = (yaml.safe_load((folder / "recipe.yaml").read_text()) or {}).get("gguf") or {}
        types.update(section.get("tensor_types") or {})
        types[""] = section.get("default_type", "F16")
    if tensor_type is not None:
        types[""] = tensor_type
    types.setdefault("", "F16")
    for pattern, name in types.items():
        check_type(name, f"type of '{pattern or 'the other tensors'}'")
    return types, section.get("ternary_type", "TQ1_0")


def check_type(name: str, what: str) -> None:
    if name.upper() not in FLOAT_TYPES and not (name in FORMATS and "gguf" in FORMATS[name].exports):
        ggml = [n for n, c in FORMATS.items() if "gguf" in c.exports]
        raise RecipeError(f"{what} '{name}': use one of {[*FLOAT_TYPES, *ggml]}")


def _type_for(gguf_name: str, tensor: torch.Tensor, types: dict[str, str]) -> str:
    if tensor.dim() < 2 or ".ffn_gate_inp" in gguf_name:  # norms, biases, routers: F32, as llama.cpp keeps them
        return "F32"
    name = next((name for pattern, name in types.items() if pattern and re.search(pattern, gguf_name)), types[""])
    if name.upper() in FLOAT_TYPES or tensor.shape[-1] % GGML_TYPES[name].block == 0:
        return name
    # rows a type cannot hold (DeepSeek's k_b rows of 128 as Q4_K): as llama.cpp's quantizer, a 32-weight type
    fallback = "Q8_0" if tensor.shape[-1] % 32 == 0 else "F16"
    log.info("GGUF export: %s has rows of %d, not whole %s blocks: %s", gguf_name, tensor.shape[-1], name, fallback)
    return fallback


def _metadata(writer, config, arch: GGUFArch, folder: Path) -> None:
    writer.add_name(folder.resolve().name)
    writer.add_block_count(config.num_hidden_layers)
    for method, keys in {**dict(COMMON), **dict(arch.extra)}.items():
        if callable(keys):
            value = keys(config)
        else:
            value = next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)
        if value is not None:
            getattr(writer, method)(value)
    _rope(writer, config, arch)
    _tokenizer(writer, folder, config.vocab_size)


def _rope(writer, config, arch: GGUFArch) -> None:
    import gguf

    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    kind = rope.get("rope_type", "default")
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key in ("beta_fast", "beta_slow"):
            if rope.get(key) is not None:
                getattr(writer, f"add_rope_scaling_yarn_{key}")(rope[key])
        if (factor := _yarn_attn_factor(config, rope, arch)) != 1.0:
            writer.add_rope_scaling_attn_factors(factor)
        if rope.get("truncate") is False:
            log.warning(
                "GGUF export: llama.cpp rounds yarn's correction range, which this model's rope (truncate: false) does "
                "not: its logits will differ slightly from transformers' (2.5e-3 relative on a tiny GPT-OSS at 48 tokens)."
            )
    elif kind not in ("default", None):
        raise CheckpointError(f"GGUF export: rope type '{kind}' is not mapped yet.")


def _yarn_attn_factor(config, rope: dict, arch: GGUFArch) -> float:
    """What llama.cpp multiplies its own yarn magnitude of cos/sin by to get transformers' (`attention_factor`)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, theirs = ROPE_INIT_FUNCTIONS["yarn"](config)
    factor = rope["factor"]

    def mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    # deepseek2 with a yarn_log_mul: llama.cpp takes mscale == mscale_all_dim, a ratio of 1; others get_mscale(factor)
    ours = 1.0 if arch.arch == "DEEPSEEK2" and rope.get("mscale_all_dim") is not None else mscale(1.0)
    return float(theirs) / ours


def _tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's converter writes it (tokenizer model gpt2)."""
    import json

    import gguf
    from transformers import AutoTokenizer

    spec = folder / "tokenizer.json"
    data = json.loads(spec.read_text()) if spec.is_file() else {}
    if data.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise CheckpointError(
            f"GGUF export: the tokenizer of '{folder}' is not a byte-level BPE (tokenizer.json); only those are mapped."
        )
    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, kinds = [], []
    for i in range(max(vocab_size, len(vocab))):
        if i in added:
            tokens.append(added[i].content)
            kinds.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif i in vocab:
            tokens.append(vocab[i])
            kinds.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            kinds.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(data))
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _pre_tokenizer(data: dict) -> str:
    pre = data.get("pre_tokenizer") or {}
    splits = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "Split"]
    if not splits:
        return "gpt-2"  # ByteLevel's own regex
    regexes = tuple((s.get("pattern", {}).get("Regex") or "").replace("\r", "\\r").replace("\n", "\\n") for s in splits)
    if regexes not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF export: the tokenizer's pre-tokenizer regexes {regexes!r} are not mapped yet.")
    return PRE_TOKENIZERS[regexes]


def _add_plain(writer, model, arch: GGUFArch, types: dict[str, str], skip: set[str], stats) -> None:
    """Every tensor outside the routed experts, under llama.cpp's name, in its type."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.arch), config.num_hidden_layers)
    for name, tensor in _plain_tensors(model, skip, arch):
        gguf_name = names.get_name(
            name.replace("_correction_bias", "_correction.bias"), try_suffixes=(".weight", ".bias")
        )
        if gguf_name is None:
            raise CheckpointError(f"GGUF export: llama.cpp's {arch.arch.lower()} has no tensor for '{name}'.")
        if not gguf_name.endswith((".weight", ".bias")):  # a bare parameter (GPT-OSS's sinks)
            gguf_name += ".weight"
        _add_raw(writer, gguf_name, tensor, _type_for(gguf_name, tensor, types), tensor.numel(), stats, expert=False)


def _plain_tensors(model, skip: set[str], arch: GGUFArch):
    """(source name, tensor) of what `skip` leaves, as the architecture's rewrite makes them."""
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in _float_state(model).items():
        if any(name.startswith(prefix) for prefix in skip) or (tied and name == "lm_head.weight"):
            continue
        yield from arch.rewrite(name, tensor, config) if arch.rewrite else [(name, tensor)]


def _float_state(model) -> dict[str, torch.Tensor]:
    """The state dict with each quantized non-expert linear (`dense:`) as its dequantized `weight` (and bias)."""
    from ..runtime.quantized_linear import QuantizedLinear

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    state = {}
    for name, tensor in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if module not in quantized or leaf == "bias":
            state[name] = tensor
        elif f"{module}.weight" not in state:  # its packed buffers: one weight
            state[f"{module}.weight"] = quantized[module].dequantize(torch.float32)
    return state


def _expert_tensors(model, adapter, checkpoint: bool, tensor_type: str | None):
    """[(state-dict prefix of the experts module, [(gguf name, data, type, weights)])] per MoE block."""
    import gguf

    module_names = {id(m): n for n, m in model.named_modules()}
    kinds = {"gate_proj": "FFN_GATE_EXP", "up_proj": "FFN_UP_EXP", "down_proj": "FFN_DOWN_EXP"}
    out = []
    for view in adapter.moe_blocks(model):
        if view.group is not None:
            raise CheckpointError("GGUF export: blocks with one expert set per modality are not mapped.")
        tensors = []
        for proj in PROJECTIONS:
            name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, kinds[proj])].format(bid=view.layer_index) + ".weight"
            data, qtype, numel = (_packed if checkpoint else _float)(view, proj, tensor_type, name)
            tensors.append((name, data, qtype, numel))
            if (bias := _biases(view, proj, checkpoint)) is not None:  # GPT-OSS's
                tensors.append((name.replace(".weight", ".bias"), bias, "F32", bias.numel()))
        out.append((module_names[id(view.experts)] + ".", tensors))
    return out


def _biases(view, proj: str, checkpoint: bool) -> torch.Tensor | None:
    """[experts, out] float32, or None where the experts have no biases."""
    if checkpoint:
        biases = [getattr(view.experts[e], proj).bias for e in range(view.num_experts)]
    else:
        biases = [view.expert_weights(e).bias(proj) for e in range(view.num_experts)]
    return None if biases[0] is None else torch.stack(biases).float()


def _packed(view, proj: str, ternary_type: str, name: str):
    linears = [getattr(view.experts[e], proj) for e in range(view.num_experts)]
    formats = {linear.fmt for linear in linears}
    if len(formats) > 1:
        raise CheckpointError(
            f"GGUF export: {name} mixes {sorted(f.name for f in formats)} across experts, and llama.cpp stores a "
            "layer's experts as one tensor of one type; compress with allocation.granularity: layer."
        )
    fmt = formats.pop()
    if fmt.key == TERNARY:
        return _ternary(linears, fmt, ternary_type, name)
    if "gguf" not in fmt.exports:
        raise CheckpointError(
            f"GGUF export: the experts are {fmt.name}, not a llama.cpp type; compress with a GGUF recipe "
            "(pipelines/gguf-q4_k_m.yaml, packed_format: Q4_K ...) to export its codes unchanged."
        )
    data = torch.stack([linear.weight_packed for linear in linears]).numpy()
    return data, fmt.name, len(linears) * linears[0].out_features * linears[0].in_features


def _ternary(linears, fmt, ternary_type: str, name: str):
    """Ternary experts as llama.cpp's TQ1_0 / TQ2_0 blocks: the same trits, the fp16 scale of each block of 256 (exact
    where a scale covers whole blocks: one per tensor, per row, or groups of a multiple of 256)."""
    blocks = []
    for linear in linears:
        qt = unpack(linear.packed())
        out_features, in_features = qt.shape
        full = expand_scales(qt.scales, out_features).repeat_interleave(fmt.effective_group(in_features), 1)
        full = full[:, :in_features].to(torch.float32)
        if in_features % 256 or not torch.equal(full, full[:, ::256].repeat_interleave(256, 1)):
            raise CheckpointError(
                f"GGUF export: {name}: ternary scales over {fmt.name} groups do not cover whole blocks of 256 "
                f"weights of rows of {in_features}, as {ternary_type} needs; compress ternary with group_size -1."
            )
        blocks.append(pack_ternary(qt.codes, full[:, ::256], ternary_type))
    return torch.stack(blocks).numpy(), ternary_type, len(linears) * linears[0].out_features * linears[0].in_features


def _float(view, proj: str, tensor_type: str, name: str):
    weights = torch.stack([getattr(view.expert_weights(e), proj) for e in range(view.num_experts)])
    return weights, tensor_type, weights.numel()


def _add_raw(writer, name: str, data, qtype: str, numel: int, stats, expert: bool = True) -> None:
    """`data`: block bytes [..., rows, row bytes] of a GGML type, or float weights to write (or round) in `qtype`."""
    import gguf

    qtype = qtype.upper() if qtype.upper() in FLOAT_TYPES else qtype
    if isinstance(data, torch.Tensor):
        data = _encode(data, qtype)
    if qtype in ("F32", "F16"):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
    bits = data.nbytes * 8
    for key in ("expert", "all") if expert else ("all",):
        stats[key][0] += bits
        stats[key][1] += numel


def _encode(w: torch.Tensor, qtype: str) -> np.ndarray:
    """Float weights [..., in] in a float type, or rounded onto a GGML type's grid (its block bytes)."""
    w = w.detach().to(torch.float32)
    if qtype == "F32":
        return w.numpy()
    if qtype == "F16":
        return w.to(torch.float16).numpy()
    if qtype == "BF16":
        return w.to(torch.bfloat16).view(torch.uint8).numpy()
    fmt = FORMATS[qtype].of_type(qtype)
    flat = w.reshape(-1, w.shape[-1])
    try:
        packed = fmt.pack(fmt.round(flat)).tensors["weight_packed"]
    except ValueError as exc:
        raise RecipeError(f"GGUF export: a tensor of rows of {w.shape[-1]}: {exc}") from exc
    return packed.reshape(*w.shape[:-1], -1).numpy()
