"""Export to GGUF, llama.cpp's file format (llama.cpp, Ollama, LM Studio), through llama.cpp's own `gguf` package:
its writer, architecture names, tensor name maps, metadata keys, vocabulary helpers and quant-type constants.

A moecompress checkpoint whose experts are llama.cpp types (recipes with `packed_format: Q4_K` ...) is written
with the experts' block bytes as they are: llama.cpp runs the codes GPTQ chose, not a re-rounding. Every other
tensor gets the type the checkpoint's recipe names in its `gguf:` section (or `--type`): F16 by default, norms and
routers F32 as llama.cpp's converter keeps them. A source model (no moecompress manifest) is written whole in
`--type` (F16: what llama.cpp's own quantizer starts from)."""

from __future__ import annotations

import logging
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
from ..formats.ggml_blocks import TERNARY_TYPES, pack_ternary
from ..models.base import PROJECTIONS
from ..storage.outputs import MANIFEST, check_file_output, disk_errors

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names one of our model types: its architecture and the hyperparameters beyond the common ones
    (writer method, and the config keys tried in order or a function of the config)."""

    arch: str  # gguf.MODEL_ARCH member
    extra: tuple[tuple[str, tuple[str, ...] | Callable], ...] = ()
    interleaved_rope: bool = False  # llama.cpp rotates pairs (2i, 2i+1): q and k rows are permuted from HF's halves
    norm_topk: bool | None = None  # llama.cpp's graph renormalizes the top-k routing weights (None: a metadata key)


ARCHS = {
    "qwen3_moe": GGUFArch(
        "QWEN3MOE", (("add_expert_feed_forward_length", ("moe_intermediate_size",)),), norm_topk=True
    ),
    "qwen2_moe": GGUFArch(
        "QWEN2MOE",
        (
            ("add_expert_feed_forward_length", ("moe_intermediate_size",)),
            ("add_expert_shared_feed_forward_length", ("shared_expert_intermediate_size",)),
        ),
        norm_topk=False,
    ),
    "olmoe": GGUFArch("OLMOE", norm_topk=False),
    "mixtral": GGUFArch("LLAMA", interleaved_rope=True),
    "glm4_moe": GGUFArch(
        "GLM4_MOE",
        (
            ("add_expert_feed_forward_length", ("moe_intermediate_size",)),
            ("add_expert_shared_count", ("n_shared_experts",)),
            ("add_leading_dense_block_count", ("first_k_dense_replace",)),
            ("add_expert_weights_scale", ("routed_scaling_factor",)),
            ("add_expert_weights_norm", ("norm_topk_prob",)),
            ("add_expert_gating_func", lambda c: _gguf().ExpertGatingFuncType.SIGMOID),
            ("add_rope_dimension_count", lambda c: int(c.head_dim * c.rope_parameters.get("partial_rotary_factor", 1))),
        ),
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
# Pre-tokenizer regexes of byte-level BPE tokenizers -> llama.cpp's pre-tokenizer name
PRE_TOKENIZERS = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+": "qwen2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
    "\\s+(?!\\S)|\\s+": "llama-bpe",
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
    _check_routing(arch, config)
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
                _add_raw(writer, gguf_name, data, qtype, numel, stats)
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


def _check_routing(arch: GGUFArch, config) -> None:
    norm = getattr(config, "norm_topk_prob", None)
    if arch.norm_topk is not None and norm is not None and bool(norm) != arch.norm_topk:
        raise CheckpointError(
            f"GGUF export: this {config.model_type} has norm_topk_prob={norm}, but llama.cpp's {arch.arch.lower()} "
            f"always {'renormalizes' if arch.norm_topk else 'keeps'} the top-k routing weights; it would run another "
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
    for pattern, name in types.items():
        if pattern and re.search(pattern, gguf_name):
            return name
    return types[""]


def _metadata(writer, config, arch: GGUFArch, folder: Path) -> None:
    writer.add_name(folder.resolve().name)
    writer.add_block_count(config.num_hidden_layers)
    for method, keys in COMMON + arch.extra:
        if callable(keys):
            value = keys(config)
        else:
            value = next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)
        if value is not None:
            getattr(writer, method)(value)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if rope.get("rope_type", "default") not in ("default", None):
        raise CheckpointError(f"GGUF export: rope type '{rope['rope_type']}' is not mapped yet.")
    _tokenizer(writer, folder, config.vocab_size)


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
    regex = splits[0].get("pattern", {}).get("Regex")
    if regex not in PRE_TOKENIZERS:
        raise CheckpointError(f"GGUF export: the tokenizer's pre-tokenizer regex {regex!r} is not mapped yet.")
    return PRE_TOKENIZERS[regex]


def _interleave_rope(w: torch.Tensor, config, name: str) -> torch.Tensor:
    """HF rotates the two halves of each head, llama.cpp's llama graph adjacent pairs: reorder each head's rows."""
    heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_plain(writer, model, arch: GGUFArch, types: dict[str, str], skip: set[str], stats) -> None:
    """Every tensor outside the routed experts, under llama.cpp's name, in its type."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.arch), config.num_hidden_layers)
    for name, tensor in _plain_tensors(model, skip, config):
        gguf_name = names.get_name(
            name.replace("_correction_bias", "_correction.bias"), try_suffixes=(".weight", ".bias")
        )
        if gguf_name is None:
            raise CheckpointError(f"GGUF export: llama.cpp's {arch.arch.lower()} has no tensor for '{name}'.")
        if arch.interleaved_rope and re.search(r"\.attn_[qk]\.weight$", gguf_name):
            tensor = _interleave_rope(tensor, config, gguf_name)
        _add_raw(writer, gguf_name, tensor, _type_for(gguf_name, tensor, types), tensor.numel(), stats, expert=False)


def _plain_tensors(model, skip: set[str], config):
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if any(name.startswith(prefix) for prefix in skip) or (tied and name == "lm_head.weight"):
            continue
        yield name, tensor


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
        out.append((module_names[id(view.experts)] + ".", tensors))
    return out


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
