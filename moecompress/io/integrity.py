"""Checkpoint integrity: the manifest's schema, the weight files against it, config.json against it, and the
model about to be filled against the files. Every load path (moecompress.load, transformers' from_pretrained
through the registered quantizer, export) runs these checks, so a corrupted, truncated, edited or
mismatched checkpoint is an error instead of a model with random or wrong experts.

Manifest v2 (`moecompress.json`): format, format_version, source_model, summary,
  files     {file name: {bytes, sha256}}                        every weight file
  weights   {tensor name: {file, dtype, shape}}                 every stored tensor
  tensors   {module: {method, bits, group_size, sym, [ternary, packing], shape}}   every packed projection
  config    {quantization_config_sha256}                        config.json's quantization section
Version 1 manifests (no `weights`, no `config`) still load; the checks that need those fields are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats import QuantFormat
from ..models.base import PROJECTIONS
from ..runtime.factored_experts import DENSE
from ..storage.outputs import MANIFEST
from ..storage.tensorfiles import TensorFileError, file_sha256, read_header

FORMAT_VERSION = 5  # the newest this reader knows; a checkpoint is written as the oldest that holds it


QUANT_METHOD = "moecompress"
VERIFY_ENV = "MOECOMPRESS_VERIFY_HASHES"  # "0": skip the sha256 of weight files (sizes and structure still checked)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def written_version(qc: dict, guarded: bool = False) -> int:
    """5 for checkpoints with quantized non-expert linears (readers before 0.11 cannot build them), 4 with a guard
    tensor (readers before 0.7 would see an extra tensor), 3 with factored experts (readers before 0.6 cannot build
    them), else 2."""
    return 5 if qc.get("linears") else 4 if guarded else 3 if qc.get("factored") else 2


def canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hashes_enabled(default: bool = True) -> bool:
    return default and os.environ.get(VERIFY_ENV, "1") != "0"


def _require(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise CheckpointError(
            f"{where}: {what}; the manifest is malformed. Re-run `moecompress compress` to rewrite it."
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def validate_manifest(manifest, where: Path) -> dict:
    """Schema check of a parsed manifest (types, required keys, plain file names, non-empty file table)."""
    _require(isinstance(manifest, dict), where, f"expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if "format" not in manifest or not _is_int(version) or version < 1:
        raise CheckpointError(
            f"{where}: format {manifest.get('format')!r} version {version!r}: the manifest is damaged (no format, or "
            "a format_version that is not a positive integer); re-download the checkpoint or re-create it."
        )
    if manifest["format"] != QUANT_METHOD or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format {manifest.get('format')!r} version {version!r} is not readable by this "
            f"moecompress (format {QUANT_METHOD!r} versions 1-{FORMAT_VERSION}); upgrade moecompress "
            "or re-create the checkpoint."
        )
    files, tensors = manifest.get("files"), manifest.get("tensors")
    _require(isinstance(files, dict) and files, where, "'files' must list every weight file")
    for name, meta in files.items():
        _require(
            name == Path(name).name and not name.startswith(".") and name.endswith(".safetensors"),
            where,
            f"file name {name!r} is not a plain .safetensors file name",
        )
        _require(
            isinstance(meta, dict)
            and _is_int(meta.get("bytes"))
            and isinstance(meta.get("sha256"), str)
            and bool(_SHA256.match(meta["sha256"])),
            where,
            f"files[{name!r}] needs integer 'bytes' and a hex 'sha256'",
        )
    _require(isinstance(tensors, dict), where, "'tensors' must map every packed projection to its format")
    for name, meta in tensors.items():
        _require(
            isinstance(meta, dict) and _is_shape(meta.get("shape")) and len(meta["shape"]) == 2,
            where,
            f"tensors[{name!r}] needs a 2-D 'shape'",
        )
        try:
            QuantFormat.from_dict(meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{where}: tensors[{name!r}] has no valid format ({exc}); the manifest is malformed."
            ) from exc
    if version >= 2:
        weights, config = manifest.get("weights"), manifest.get("config")
        _require(isinstance(weights, dict) and weights, where, "'weights' must list every stored tensor")
        for name, meta in weights.items():
            _require(
                isinstance(meta, dict)
                and meta.get("file") in files
                and isinstance(meta.get("dtype"), str)
                and _is_shape(meta.get("shape")),
                where,
                f"weights[{name!r}] needs a listed 'file', 'dtype' and 'shape'",
            )
        _require(
            isinstance(config, dict) and isinstance(config.get("quantization_config_sha256"), str),
            where,
            "'config' must hold quantization_config_sha256",
        )
    if version >= 4 or "guard" in manifest:
        _require(manifest.get("guard") in manifest.get("weights", {}), where, "'guard' must name a stored tensor")
    return manifest


def read_manifest(path: str | Path) -> dict:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder '{path}' does not exist" + (" (it is a file)" if folder.exists() else "") + "."
        )
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"'{path}' has no {MANIFEST}: it is not a moecompress checkpoint (or it was not fully "
            "written). Re-run `moecompress compress` to create it."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON ({exc}); the checkpoint is corrupt.") from exc
    return validate_manifest(manifest, manifest_path)


def stored_tensors(folder: Path, manifest: dict) -> dict[str, tuple[list[int], str, str]]:
    """{tensor name: (shape, dtype, file)} read from the safetensors headers of the manifest's files."""
    stored: dict[str, tuple[list[int], str, str]] = {}
    for name in manifest["files"]:
        try:
            header = read_header(folder / name)
        except TensorFileError as exc:
            raise CheckpointError(f"{exc}; re-download or re-export the checkpoint.") from exc
        stored.update({key: (list(t.shape), t.dtype, name) for key, t in header.items()})
    return stored


def _check_files(folder: Path, manifest: dict, check_hashes: bool) -> None:
    for name, meta in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file {file} is missing; copy the whole folder or re-export it.")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{file} is {size} bytes but the manifest says {meta['bytes']}: the file is truncated "
                "or was replaced. Re-download or re-export the checkpoint."
            )
        if check_hashes and file_sha256(file) != meta["sha256"]:
            raise CheckpointError(
                f"{file} does not match its sha256 in {MANIFEST}: the file is corrupt. Re-download it."
            )


def _compare(expected: dict[str, list[int]], found: dict[str, list[int]], what: str, folder: Path) -> None:
    """Missing, extra or reshaped tensors: an error naming a few of each."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if list(expected[k]) != list(found[k]))
    problems = [
        f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})"
        for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", reshaped))
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{folder}: {what} disagree ({'; '.join(problems)}). The checkpoint was edited or "
            "damaged; re-download or re-create it."
        )


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; copy the whole checkpoint folder.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path} has no moecompress quantization_config; the folder does not match its manifest.")
    return config


def expected_packed_formats(qc: dict, folder: Path) -> dict[str, QuantFormat]:
    """{projection module: format} that config.json's quantization_config declares."""
    try:
        formats = [QuantFormat.from_dict(f) for f in qc["formats"]]
        declared = {
            f"{module}.{e}.{p}": formats[i]
            for module, rows in qc["experts"].items()
            for e, row in enumerate(rows)
            for p, i in zip(PROJECTIONS, row, strict=True)
        }
        for module, layout in qc.get("factored", {}).items():
            for p, i in zip(PROJECTIONS, layout["base"] or [], strict=bool(layout["base"])):
                declared[f"{module}.base.{p}"] = formats[i]
            for e, row in enumerate(layout["deltas"]):
                for p, (rank, a, b) in zip(PROJECTIONS, row, strict=True):
                    names = [] if not rank else ["weight"] if rank == DENSE else ["lora_A", "lora_B"]
                    declared.update({f"{module}.{e}.{p}.{n}": formats[i] for n, i in zip(names, (a, b))})
        declared.update({module: formats[i] for module, i in qc.get("linears", {}).items()})
        return declared
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization_config is malformed ({type(exc).__name__}: {exc})."
        ) from exc


def packed_buffer_shapes(module: str, fmt: QuantFormat, shape: list[int]) -> dict[str, list[int]]:
    return {f"{module}.{name}": stored for name, (stored, _) in fmt.stored_shapes(*shape).items()}


def verify_checkpoint(path: str | Path, check_hashes: bool = True) -> dict:
    """Check the manifest, every weight file (presence, size, sha256, header), config.json's quantization
    section and the packed tensors' formats and shapes against each other; return the manifest."""
    return verify_checkpoint_files(path, check_hashes)[0]


def verify_checkpoint_files(
    path: str | Path, check_hashes: bool = True
) -> tuple[dict, dict[str, tuple[list[int], str, str]]]:
    """`verify_checkpoint`, also returning what the weight files hold ({tensor: (shape, dtype, file)})."""
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    _check_files(folder, manifest, hashes_enabled(check_hashes))
    stored = stored_tensors(folder, manifest)
    found = {k: v[0] for k, v in stored.items()}
    if "weights" in manifest:
        _compare(
            {k: m["shape"] for k, m in manifest["weights"].items()}, found, f"the weight files and {MANIFEST}", folder
        )
        moved = [k for k, m in manifest["weights"].items() if stored[k][1:] != (m["dtype"], m["file"])]
        if moved:
            raise CheckpointError(
                f"{folder}: {moved[0]} has another dtype or file than {MANIFEST} says; re-download it."
            )
    qc = read_config(folder)["quantization_config"]
    if "config" in manifest and canonical_sha256(qc) != manifest["config"]["quantization_config_sha256"]:
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization_config was changed after the checkpoint was written "
            f"(its hash differs from {MANIFEST}); restore the original config.json."
        )
    declared = expected_packed_formats(qc, folder)
    _compare(
        {k: [] for k in declared},
        {k: [] for k in manifest["tensors"]},
        f"config.json and {MANIFEST} packed modules",
        folder,
    )
    for module, fmt in declared.items():
        if QuantFormat.from_dict(manifest["tensors"][module]) != fmt:
            raise CheckpointError(
                f"{folder}: {module} is {QuantFormat.from_dict(manifest['tensors'][module]).name} in "
                f"{MANIFEST} but {fmt.name} in config.json; restore the original files."
            )
    packed = {
        k: v
        for m, meta in manifest["tensors"].items()
        for k, v in packed_buffer_shapes(m, declared[m], meta["shape"]).items()
    }
    _compare(packed, {k: found[k] for k in packed if k in found}, "packed tensor shapes and their formats", folder)
    return manifest, stored


def check_model_against_files(
    model: torch.nn.Module, stored: dict[str, tuple[list[int], str, str]], folder: Path, guard: str | None = None
) -> None:
    """The (meta-device) model about to be filled needs exactly the stored tensors (tied copies and the `guard`
    aside), same shapes."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    expected = {k: list(t.shape) for k, t in model.state_dict().items()}
    found = {k: v[0] for k, v in stored.items() if k != guard}
    for key in tied - set(found):
        expected.pop(key, None)
    _compare(expected, found, "the model built from config.json and the weight files", folder)
