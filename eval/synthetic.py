"""Random-weight Qwen3-MoE checkpoints of any depth, written as a real one is: bf16, per-expert tensor names
(`mlp.experts.{e}.gate_proj.weight`, which transformers fuses on load), sharded safetensors with an index, the
tokenizer of ../shared/models/moe-tiny-text. Generated one layer at a time, so a checkpoint larger than memory
can be built. For scale and speed tests only: random weights say nothing about quality.

    python eval/synthetic.py OUT --layers 16 [--experts 32 --hidden 1024 --intermediate 512 --top-k 4]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from moecompress.storage.tensorfiles import write_safetensors

TOKENIZER = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "moe-tiny-text"


def config(layers: int, experts: int, hidden: int, intermediate: int, top_k: int, vocab: int) -> dict:
    base = json.loads((TOKENIZER / "config.json").read_text())
    heads = hidden // 64
    return {
        **base,
        "hidden_size": hidden,
        "moe_intermediate_size": intermediate,
        "intermediate_size": 3 * intermediate,
        "num_experts": experts,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(heads // 4, 1),
        "head_dim": 64,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def layer_tensors(i: int, cfg: dict) -> dict[str, tuple[int, ...] | None]:
    """Layer `i`'s tensors as name: shape of a random matrix (None: a norm's vector of ones)."""
    H, inter, E, d = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    out = {
        p + "input_layernorm.weight": (H,),
        p + "post_attention_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (q, H),
        p + "self_attn.k_proj.weight": (kv, H),
        p + "self_attn.v_proj.weight": (kv, H),
        p + "self_attn.o_proj.weight": (H, q),
        p + "self_attn.q_norm.weight": (d,),
        p + "self_attn.k_norm.weight": (d,),
        p + "mlp.gate.weight": (E, H),
    }
    for e in range(E):
        out.update(
            {
                f"{p}mlp.experts.{e}.gate_proj.weight": (inter, H),
                f"{p}mlp.experts.{e}.up_proj.weight": (inter, H),
                f"{p}mlp.experts.{e}.down_proj.weight": (H, inter),
            }
        )
    return out


def make(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A norm's ones, the embeddings at 0.02, any other matrix at 1 / sqrt(fan-in); bf16."""
    if len(shape) == 1:
        return torch.ones(*shape, dtype=torch.bfloat16)
    scale = 0.02 if name == "model.embed_tokens.weight" else shape[-1] ** -0.5
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


def build(
    out: Path,
    layers: int,
    experts: int = 32,
    hidden: int = 1024,
    intermediate: int = 512,
    top_k: int = 4,
    vocab: int = 8192,
    shard_bytes: int = 1 << 30,
    seed: int = 0,
) -> Path:
    """Write the checkpoint to `out` (a new folder) and return it. Shards hold whole layers where they fit (as
    transformers' save_pretrained does) and are generated one at a time, so a layer larger than memory can be built."""
    cfg = config(layers, experts, hidden, intermediate, top_k, vocab)
    gen = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    groups = [
        {"model.embed_tokens.weight": (vocab, hidden)},
        *(layer_tensors(i, cfg) for i in range(layers)),
        {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)},
    ]
    plan, size = [{}], 0
    for group in groups:
        nbytes = 2 * sum(math.prod(s) for s in group.values())
        items = [group] if nbytes <= shard_bytes else [{k: v} for k, v in group.items()]
        for item in items:
            nbytes = 2 * sum(math.prod(s) for s in item.values())
            if plan[-1] and size + nbytes > shard_bytes:
                plan.append({})
                size = 0
            plan[-1].update(item)
            size += nbytes
    weight_map, total = {}, 0
    for n, members in enumerate(plan):
        name = f"model-{n + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {k: make(k, shape, gen) for k, shape in members.items()}
        write_safetensors(out / name, list(shard.values()), list(shard))
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.nbytes for t in shard.values())
        del shard
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(TOKENIZER / name, out / name)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=4)
    args = parser.parse_args()
    print(build(args.out, args.layers, args.experts, args.hidden, args.intermediate, args.top_k))
