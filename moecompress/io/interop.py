"""Export a uniform-bit moecompress checkpoint in layouts other engines read.

- `compressed-tensors` (`pack-quantized`): read by transformers + compressed-tensors, vLLM, SGLang.
- `gptq` (GPTQ v1, `quantize_config.json`): read by GPTQModel and the engines that take GPTQ checkpoints.

Both store the experts under the per-expert names of the architecture's original checkpoints (the names
transformers' conversion mapping fuses on load, e.g. `...experts.{e}.w1` for Mixtral) and copy every other
tensor unchanged. Mixed-precision, ternary, expert-mapped and dynamically skipping checkpoints have no
equivalent in these formats and are refused.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..formats import QuantFormat
from ..formats.bitpack import pack_codes
from ..storage.outputs import atomic_folder
from ..storage.tensorfiles import write_sharded
from .checkpoint import copy_aux_files, verify_checkpoint

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("compressed-tensors", "gptq")
_PACKED_SUFFIX = re.compile(
    r"^(?P<module>.+\.experts\.\d+\.(gate|up|down)_proj)\.(?P<tensor>weight_packed|weight_scale|weight_zero_point)$"
)


def to_compressed_tensors(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int], fmt: QuantFormat
) -> dict[str, torch.Tensor]:
    """moecompress tensors -> compressed-tensors `pack-quantized` module tensors.

    The code stream is already `pack_to_int32(q - 2^(bits-1))`; the zero point is stored only when asymmetric,
    as signed `z - 2^(bits-1)` packed along the output dimension (compressed-tensors' `packed_dim=0`)."""
    tensors = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor(shape, dtype=torch.int64)}
    if not fmt.sym:
        # Unsigned codes pack identically to compressed-tensors' offset-signed values, along the transposed axis.
        tensors["weight_zero_point"] = pack_codes(zero.T.contiguous(), fmt.bits).T.contiguous()
    return tensors


def to_gptq_v1(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, int], fmt: QuantFormat
) -> dict[str, torch.Tensor]:
    """moecompress tensors -> GPTQ v1 `qweight [in*bits/32, out]`, `qzeros [groups, out*bits/32]` (zero - 1),
    `scales [groups, out]` fp16 and `g_idx [in]`."""
    out_features, in_features = shape
    if in_features * fmt.bits % 32 or out_features * fmt.bits % 32:
        raise CheckpointError(
            f"a {out_features}x{in_features} projection at {fmt.bits} bits does not fill whole int32 "
            "words, which GPTQ v1 requires; export it as compressed-tensors instead."
        )
    if int(zero.min()) == 0:
        raise CheckpointError(
            "GPTQ v1 stores zero points minus one and cannot represent a zero point of 0, which this "
            "checkpoint uses; export it as compressed-tensors (or re-quantize with sym: true)."
        )
    group = in_features if fmt.group_size == -1 else fmt.group_size
    return {
        "qweight": packed.T.contiguous(),
        "qzeros": pack_codes((zero.to(torch.int16) - 1).to(torch.uint8).T.contiguous(), fmt.bits),
        "scales": scale.T.contiguous().to(torch.float16),
        "g_idx": (torch.arange(in_features, dtype=torch.int32) // group),
    }


def compressed_tensors_config(fmt: QuantFormat, ignore: list[str], projections: list[str]) -> dict:
    strategy = "channel" if fmt.group_size == -1 else "group"
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": [rf"re:.*experts\.\d+\.({'|'.join(projections)})$"],
                "weights": {
                    "num_bits": fmt.bits,
                    "type": "int",
                    "symmetric": fmt.sym,
                    "strategy": strategy,
                    "group_size": None if fmt.group_size == -1 else fmt.group_size,
                    "dynamic": False,
                    "actorder": None,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def gptq_config(fmt: QuantFormat, projections: list[str]) -> dict:
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": fmt.bits,
        "group_size": fmt.group_size,
        "sym": fmt.sym,
        "desc_act": False,
        "true_sequential": True,
        # GPTQModel's per-module override: quantize only the routed experts' projections.
        "dynamic": {rf"-:^(?!.*experts\.\d+\.({'|'.join(projections)})$).*": {}},
    }


def checkpoint_projection_names(model_type: str) -> dict[str, str]:
    """How the model's original checkpoints name each expert projection (`gate_proj` -> `w1` for Mixtral), read
    from the transformers conversion mapping that fuses per-expert weights on load. Architectures whose checkpoints
    store experts fused (Qwen3-VL-MoE) have no per-expert layout that transformers loads: refused."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    names = {}
    for converter in get_checkpoint_conversion_mapping(model_type) or []:
        sources = [re.search(r"experts\.\*\.(\w+)\.weight$", src) for src in getattr(converter, "source_patterns", [])]
        targets = getattr(converter, "target_patterns", [])
        if not sources or not all(sources) or not targets:
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(sources) == 2:
            names["gate_proj"], names["up_proj"] = sources[0][1], sources[1][1]
        elif targets[0].endswith("experts.down_proj"):
            if len(targets) > 1:  # ERNIE-4.5-VL: one stored list, split into text and vision sets on load
                raise CheckpointError(
                    f"transformers splits one stored {model_type} expert list into text and vision sets on load, "
                    "which the GPTQ / compressed-tensors export does not write yet: export with --format "
                    "moecompress (loads with moecompress.load and from_pretrained)."
                )
            names["down_proj"] = sources[0][1]
    if set(names) != {"gate_proj", "up_proj", "down_proj"}:
        raise CheckpointError(
            f"transformers stores {model_type} experts fused, so no per-expert GPTQ / compressed-tensors layout loads "
            "there; export with --format moecompress (loads with moecompress.load)."
        )
    return names


def uniform_format(config: dict) -> QuantFormat:
    """The single integer format of a moecompress checkpoint's experts, or a CheckpointError saying why not."""
    qc = config.get("quantization_config", {})
    uses = (
        ("expert_maps", "merged experts with router 'keep'"),
        ("dynamic_skip", "dynamic expert skipping"),
        ("factored", "factored experts (a shared base and low-rank deltas)"),
    )
    for key, why in uses:
        if qc.get(key):
            raise CheckpointError(
                f"this checkpoint uses {why}, which only moecompress can run; export it with --format moecompress."
            )
    used = {i for rows in qc.get("experts", {}).values() for row in rows for i in row}
    formats = [QuantFormat.from_dict(qc["formats"][i]) for i in sorted(used)]
    if len(formats) != 1:
        raise CheckpointError(
            f"the experts use {len(formats)} formats ({', '.join(f.name for f in formats)}); "
            "GPTQ and compressed-tensors need one bit width for every expert. Export with "
            "--format moecompress, or compress with a uniform recipe (e.g. pipelines/gptq-w4g128.yaml)."
        )
    if not formats[0].exports:
        raise CheckpointError(
            f"{formats[0].name} experts have no GPTQ or compressed-tensors layout; export with --format moecompress."
        )
    return formats[0]


def _check_target_loads(fmt: QuantFormat, fmt_name: str, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse at export time what the target's loaders refuse at load time; warn where only some engines load it."""
    if fmt.group_size != -1:
        for module, (_, in_features) in sorted(shapes.items()):
            if in_features % fmt.group_size:
                raise CheckpointError(
                    f"{module} has {in_features} inputs, not a multiple of group size {fmt.group_size}: {fmt_name} "
                    "loaders need whole groups (transformers raises at load time). Re-compress with a group size "
                    "that divides every expert projection's input size (e.g. group_size: -1, per row)."
                )
    if fmt_name == "compressed-tensors" and not fmt.sym:
        log.warning(
            "asymmetric experts: vLLM and SGLang load this export, transformers (<= 5.23) cannot load "
            "asymmetric MoE experts; for transformers re-compress with a symmetric recipe "
            "(pipelines/gptq-w4g128-sym.yaml)."
        )


def export_interop(checkpoint: str | Path, output: str | Path, fmt_name: str, overwrite: bool = False) -> Path:
    """Write `checkpoint` (a moecompress folder) at `output` in `fmt_name` ("compressed-tensors" or "gptq"), atomically."""
    with atomic_folder(output, [checkpoint], overwrite, kind="export") as tmp:
        write_interop_files(checkpoint, tmp, fmt_name)
    return Path(output).expanduser().resolve()


def write_interop_files(checkpoint: str | Path, dest: Path, fmt_name: str) -> None:
    """Write the `fmt_name` form of `checkpoint` into the (empty) folder `dest`."""
    if fmt_name not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format '{fmt_name}'; use one of {EXPORT_FORMATS} or moecompress.")
    folder = Path(checkpoint).expanduser()
    manifest = verify_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    fmt = uniform_format(config)
    if fmt_name not in fmt.exports:
        raise CheckpointError(
            f"{fmt.name} experts have no {fmt_name} layout; export as {' or '.join(sorted(fmt.exports))}."
        )
    projection_names = checkpoint_projection_names(config["model_type"])
    shapes = {name: tuple(meta["shape"]) for name, meta in manifest["tensors"].items()}

    plain: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for file in (folder / name for name in manifest["files"]):
        with safe_open(str(file), "pt") as f:
            for key in (k for k in f.keys() if k != manifest.get("guard")):
                match = _PACKED_SUFFIX.match(key)
                if match:
                    grouped.setdefault(match["module"], {})[match["tensor"]] = f.get_tensor(key)
                else:
                    plain[key] = f.get_tensor(key)
    _check_target_loads(fmt, fmt_name, {module: shapes[module] for module in grouped})
    convert = to_compressed_tensors if fmt_name == "compressed-tensors" else to_gptq_v1
    state = dict(plain)
    for module, tensors in grouped.items():
        zero = fmt.zero_points(tensors)
        if fmt.sym and bool((zero != fmt.fixed_zero).any()):
            raise CheckpointError(
                f"{module}: symmetric format with a zero point other than 2^(bits-1); the checkpoint is corrupt."
            )
        prefix, _, projection = module.rpartition(".")
        for name, tensor in convert(
            tensors["weight_packed"], tensors["weight_scale"], zero, shapes[module], fmt
        ).items():
            state[f"{prefix}.{projection_names[projection]}.{name}"] = tensor

    if fmt_name == "compressed-tensors":
        ignore = sorted({k.rsplit(".", 1)[0] for k, t in plain.items() if k.endswith(".weight") and t.dim() == 2})
        config["quantization_config"] = compressed_tensors_config(fmt, ignore, list(projection_names.values()))
    else:
        config["quantization_config"] = gptq_config(fmt, list(projection_names.values()))

    write_sharded(dest, state.items())
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    if fmt_name == "gptq":
        (dest / "quantize_config.json").write_text(json.dumps(config["quantization_config"], indent=2))
    copy_aux_files(str(folder), dest)
    for extra in ("recipe.yaml", "run.json"):
        if (folder / extra).is_file():
            (dest / extra).write_text((folder / extra).read_text())
    (dest / "moecompress_export.json").write_text(
        json.dumps(
            {"exported_from": folder.resolve().name, "format": fmt_name, "source_model": manifest.get("source_model")},
            indent=2,
        )
    )
