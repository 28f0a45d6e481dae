"""The moecompress packed checkpoint: a transformers model folder whose routed experts are bit-packed.

Layout (docs/FORMAT.md):
  config.json                    the model config + `quantization_config` (quant_method "moecompress")
  model.safetensors | model-0000i-of-0000n.safetensors (+ model.safetensors.index.json)
  moecompress.json               manifest: per packed tensor method/bits/group/sym/shape, per file size + sha256
  recipe.yaml                    the recipe that produced it
  tokenizer / processor / generation files copied from the source
Everything is written to a temporary sibling folder and renamed into place, so a crash never leaves a
half-written checkpoint at the output path.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..formats import QuantFormat
from ..models.base import PROJECTIONS
from ..models.loading import empty_weights
from ..runtime.factored_experts import FactoredExperts
from ..runtime.packed_experts import PackedExperts, PackedLinear, persistent_state
from ..runtime.quantized_linear import QuantizedLinear
from ..storage.outputs import MANIFEST, atomic_folder
from ..storage.tensorfiles import StoredTensor, write_sharded
from .integrity import (
    QUANT_METHOD,
    canonical_sha256,
    file_sha256,
    read_manifest,
    stored_tensors,
    verify_checkpoint,
    written_version,
)

__all__ = ["MANIFEST", "read_manifest", "save_checkpoint", "verify_checkpoint"]
_AUX_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "*.py",
)


def quantization_config(model: nn.Module, guarded: bool = False) -> dict:
    """The `quantization_config` that lets the loader rebuild every `PackedExperts` before loading weights;
    `guarded`: the checkpoint stores a `plain_guard` tensor."""
    from ..runtime.packed_experts import MappedExperts

    formats: list[QuantFormat] = []
    experts: dict[str, list[list[int]]] = {}
    expert_maps: dict[str, list[int]] = {}
    factored: dict[str, dict] = {}
    linears: dict[str, int] = {}

    def index(fmt: QuantFormat | None) -> int | None:
        if fmt is not None and fmt not in formats:
            formats.append(fmt)
        return None if fmt is None else formats.index(fmt)

    for name, module in model.named_modules():
        if isinstance(module, MappedExperts):
            expert_maps[name] = module.slot_map.tolist()
        if isinstance(module, PackedExperts):
            experts[name] = [[index(per_expert[p]) for p in PROJECTIONS] for per_expert in module.formats()]
        if isinstance(module, QuantizedLinear):
            linears[name] = index(module.fmt)
        if isinstance(module, FactoredExperts):
            base = module.base_formats()
            factored[name] = {
                "base": [index(base[p]) for p in PROJECTIONS] if base else None,
                "deltas": [[[d[p][0], index(d[p][1]), index(d[p][2])] for p in PROJECTIONS] for d in module.deltas()],
            }
    return {
        "quant_method": QUANT_METHOD,
        "format_version": written_version({"factored": factored, "linears": linears}, guarded),
        "formats": [f.to_dict() for f in formats],
        "experts": experts,
        **({"factored": factored} if factored else {}),
        **({"linears": linears} if linears else {}),
        **({"expert_maps": expert_maps} if expert_maps else {}),
        **({"dynamic_skip": model.skip_controller.rule.to_dict()} if hasattr(model, "skip_controller") else {}),
    }


def plain_guard(model: nn.Module) -> str | None:
    """The name of a weight that the plain architecture of `model` has and a packed checkpoint replaces (an expert
    weight of the first packed block), or None without packed experts. Stored under that name with a shape it cannot
    have, it makes transformers refuse the checkpoint (size mismatch) when config.json lost its quantization_config,
    instead of building the model with random experts; moecompress's loaders skip it (the manifest names it)."""
    packed = next((n for n, m in model.named_modules() if isinstance(m, (PackedExperts, FactoredExperts))), None)
    if packed is None:
        return None
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with empty_weights():
        plain = type(model)._from_config(config)
    names = sorted(n for n, p in plain.named_parameters() if n.startswith(packed + ".") and p.shape != (1,))
    return names[0] if names else None


def save_checkpoint(
    model: nn.Module,
    output: str | Path,
    recipe_yaml: str,
    source: str,
    summary: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 10**9,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
    tensors: Iterable[tuple[str, torch.Tensor | StoredTensor]] | None = None,
) -> Path:
    """Write `model` (with `PackedExperts` modules) as a packed checkpoint at `output`, atomically. `output` must
    be new or (with `overwrite`) an earlier moecompress output; never the source or a folder around it.
    `tensors`: the weights to store when `model` does not hold them (a streamed run: its layers are on disk)."""
    with atomic_folder(output, [source], overwrite, kind="checkpoint") as tmp:
        state = list(tensors if tensors is not None else persistent_state(model, dtype).items())
        guard = plain_guard(model)
        if guard is not None:
            state.append((guard, torch.zeros(1, dtype=dtype)))
        names = write_sharded(tmp, state, max_shard_bytes)
        config = model.config
        config.quantization_config = quantization_config(model, guard is not None)
        config.dtype = dtype
        config.save_pretrained(tmp)
        copy_aux_files(source, tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

        tensors = {}
        for name, module in model.named_modules():
            if isinstance(module, PackedLinear):
                tensors[name] = {
                    "method": getattr(module, "method", "gptq"),
                    **module.fmt.to_dict(),
                    "shape": [module.out_features, module.in_features],
                }
        files = {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in names}
        stored = stored_tensors(tmp, {"files": files})
        manifest = {
            "format": QUANT_METHOD,
            "format_version": written_version(config.quantization_config, guard is not None),
            "source_model": source,
            "summary": summary or {},
            "config": {"quantization_config_sha256": canonical_sha256(config.quantization_config)},
            "tensors": tensors,
            "weights": {k: {"file": f, "dtype": d, "shape": shape} for k, (shape, d, f) in stored.items()},
            "files": files,
            **({"guard": guard} if guard is not None else {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(output).expanduser().resolve()


def copy_aux_files(source: str, dest: Path) -> None:
    """Tokenizer, processor and generation files of `source`: no dotfiles, and no links leading out of the folder
    (or, for a Hugging Face cache snapshot, out of its blob store)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    for pattern in _AUX_PATTERNS:
        for path in folder.glob(pattern):
            if (
                path.is_file()
                and inside(folder, path)
                and not path.name.startswith(".")
                and not (dest / path.name).exists()
            ):
                shutil.copyfile(path, dest / path.name)


def inside(folder: Path, path: Path) -> bool:
    """Whether `path` resolves inside `folder` (or, for a Hugging Face cache snapshot, inside its blob store)."""
    root = folder.resolve()
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    return any(r in path.resolve().parents for r in roots)
