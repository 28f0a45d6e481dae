"""safetensors files read and written piecewise: a header check that finds truncated files before any work, and
a writer that copies tensors into a shard one at a time (from memory or byte ranges of other safetensors
files), so that assembling a multi-GB shard never holds more than one tensor in memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import OutputError

_MAX_HEADER = 100 << 20
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class TensorFileError(ValueError):
    """A safetensors file is missing, unreadable or shorter than its header says."""


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are, so they can be copied without parsing them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (ulimit -f), or None when there is none."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, checked against the file's size (a truncated file is refused)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise TensorFileError(f"{path} is {size} bytes, too short to be a safetensors file")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER or 8 + length > size:
                raise TensorFileError(f"{path} has a damaged or truncated header")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise TensorFileError(f"{path} does not exist") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TensorFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    base = 8 + length
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        if base + end > size:
            raise TensorFileError(f"{path} is truncated: tensor '{name}' ends at byte {base + end} of {size}")
        tensors[name] = StoredTensor(name, meta["dtype"], tuple(meta["shape"]), path, base + begin, end - begin)
    return tensors


def _tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's bytes without a copy (when it is contiguous on the CPU)."""
    t = tensor.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""


def write_safetensors(
    path: Path, tensors: Iterable[torch.Tensor | StoredTensor], names: Iterable[str], sync: bool = True
) -> None:
    """Write a safetensors file of `tensors` (in-memory tensors, or byte ranges of other files) named `names`,
    one tensor at a time; the header is laid out first from shapes and dtypes alone. `sync`: fsync it (scratch
    files that a rerun recomputes need not be)."""
    items = list(zip(names, tensors))
    header, offset = {}, 0
    for name, t in items:
        if isinstance(t, StoredTensor):
            dtype, shape, nbytes = t.dtype, list(t.shape), t.nbytes
        else:
            dtype, shape, nbytes = _DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    umask = os.umask(0)
    os.umask(umask)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in items:
            if isinstance(t, StoredTensor):
                _copy_range(t, out)
            else:
                out.write(_tensor_bytes(t))
        out.flush()
        if sync:
            os.fsync(out.fileno())
    os.chmod(path, 0o666 & ~umask)


def _copy_range(t: StoredTensor, out, chunk: int = 64 << 20) -> None:
    with open(t.file, "rb") as src:
        src.seek(t.start)
        left = t.nbytes
        while left:
            data = src.read(min(chunk, left))
            if not data:
                raise TensorFileError(f"{t.file} ended inside tensor '{t.name}'")
            out.write(data)
            left -= len(data)


def _nbytes(t: torch.Tensor | StoredTensor) -> int:
    return t.nbytes if isinstance(t, StoredTensor) else t.numel() * t.element_size()


def write_sharded(
    folder: Path, tensors: Iterable[tuple[str, torch.Tensor | StoredTensor]], max_shard_bytes: int = 5 * 10**9
) -> list[str]:
    """Write named tensors as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards of at most
    `max_shard_bytes` (a larger tensor gets its own) plus `model.safetensors.index.json`; return the file names."""
    tensors, limit = list(tensors), file_size_limit()
    big = next((name for name, t in tensors if limit is not None and _nbytes(t) > limit), None)
    if big is not None:
        raise OutputError(
            f"tensor {big} alone is {_nbytes(dict(tensors)[big])} bytes, above the file-size limit of {limit} bytes "
            "(ulimit -f): no shard size can hold it; raise the limit and rerun."
        )
    shards, size = [[]], 0
    for name, t in tensors:
        nbytes = _nbytes(t)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = 0
    for file, shard in zip(names, shards):
        write_safetensors(folder / file, [t for _, t in shard], [n for n, _ in shard])
        total += sum(_nbytes(t) for _, t in shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(names, shards) for n, _ in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


class DiskTensors:
    """A list of tensors kept on disk, one safetensors file each in `folder`, read back one at a time (calibration
    activations that should not stay in memory); or, with `entries`, a read-only view of tensors in existing files."""

    def __init__(self, folder: Path | None = None, device: str | torch.device = "cpu", entries=None):
        self.folder, self.device = folder, str(device)
        self.entries: list[StoredTensor] = list(entries or [])

    @classmethod
    def of_file(cls, path: Path, device: str | torch.device = "cpu") -> DiskTensors:
        """The tensors of one file named 0, 1, ... in that order."""
        stored = read_header(path)
        return cls(device=device, entries=[stored[str(i)] for i in range(len(stored))])

    def append(self, tensor: torch.Tensor) -> None:
        if not self.entries:
            self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{len(self.entries):06d}.safetensors"
        write_safetensors(path, [tensor], ["t"], sync=False)
        self.entries.append(read_header(path)["t"])

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        for t in self.entries:
            with safe_open(str(t.file), "pt", device=self.device) as f:
                yield f.get_tensor(t.name)

    def remove(self) -> None:
        """Delete the files this list wrote and its folder (never those of a view)."""
        if self.folder is not None:
            for t in self.entries:
                t.file.unlink(missing_ok=True)
            self.entries = []
            with contextlib.suppress(OSError):
                self.folder.rmdir()
