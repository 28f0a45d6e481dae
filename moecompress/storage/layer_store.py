"""The resumable state of a streamed `compress`: `<output>.compress-state/`.

Per finished decoder layer: its output tensors (`layer-00012.safetensors`, exactly as the checkpoint stores
them; a layer worked on in chunks of experts has each chunk's experts in a part, `part-00012-00064.safetensors`
from expert 64, written as the chunk is done), the calibration activations leaving it (`hidden-00012.safetensors`,
only the newest kept) and its record (`layer-00012.json`, written last: a layer counts as done once its record
exists; it holds the sha256 of every file and the job's fingerprint). Every file is written to a temporary name,
synced and renamed, so a kill at any moment leaves either the old state or the new one. A run started again with
the same job fingerprint (recipe, source files, calibration data, plan) verifies every stored layer and resumes
after the last one; a state that fails (a changed, truncated or missing file) is dropped and the job starts over,
saying why; any other job is refused. The final checkpoint's shards are assembled from the layer files by byte
copy, once every layer is there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import OutputError
from .outputs import disk_errors
from .tensorfiles import DiskTensors, StoredTensor, file_sha256, read_header, write_safetensors

log = logging.getLogger(__name__)

JOB = "job.json"


def state_folder(output: str | Path) -> Path:
    return Path(str(Path(output).expanduser()) + ".compress-state")


class LayerStore:
    """Writes run on one background thread, so that a layer's files are written and synced while the next layer
    is computed; at most one layer is in flight, and its error surfaces at the next `save_layer` or `flush`."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecompress-store")
        self._pending: Future | None = None
        self._parts: dict[int, dict[str, str]] = {}  # per layer in progress, its parts written: file name -> sha256
        job = folder / JOB
        if job.is_file():
            try:
                found = json.loads(job.read_text()).get("fingerprint")
            except (OSError, ValueError):
                found = None
            if found != fingerprint:
                raise OutputError(
                    f"{folder} holds the state of another compress job (different recipe, source or "
                    "plan); rerun that job's command to resume it, or delete the folder to start over."
                )

    def _create(self) -> None:
        """The folder appears with the first finished work: a run that fails before leaves nothing behind."""
        if not (self.folder / JOB).is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_text(JOB, json.dumps({"fingerprint": self.fingerprint}))

    def _path(self, kind: str, index: int, ext: str) -> Path:
        return self.folder / f"{kind}-{index:05d}.{ext}"

    def _write_text(self, name: str, text: str) -> None:
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)

    def done(self) -> list[int]:
        """The stored layers (a layer in flight counts once its record is written)."""
        if not self.folder.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("layer-*.json"))

    def record(self, index: int) -> dict:
        return json.loads(self._path("layer", index, "json").read_text())

    def resume_point(self) -> tuple[int, DiskTensors] | None:
        """(first layer to do, its calibration inputs, read from disk one at a time), or None to start at layer 0:
        nothing stored, or stored layers that fail verification (dropped, with a warning naming the reason)."""
        done = self.done()
        if not done:
            return None
        problem = self.problem(done)
        if problem is not None:
            log.warning("%s: %s; the stored layers are dropped and the job starts over", self.folder, problem)
            self._drop_layers()
            return None
        return done[-1] + 1, DiskTensors.of_file(self._path("hidden", done[-1], "safetensors"))

    def problem(self, done: list[int]) -> str | None:
        """Why stored layers `done` cannot be trusted, or None: layers 0..n-1, each file as its record hashed it."""
        if done != list(range(len(done))):
            return f"layer {min(set(range(done[-1] + 1)) - set(done))} is missing before layer {done[-1]}"
        for index in done:
            try:
                record = self.record(index)
                hashes, job = record["files"], record["job"]
            except (OSError, ValueError, KeyError, TypeError):
                return f"the record of layer {index} is unreadable or holds no file hashes"
            if job != self.fingerprint:
                return f"layer {index} was stored by another job"
            names = [self._path("layer", index, "safetensors").name, *record.get("parts", [])]
            if index == done[-1]:
                names.append(self._path("hidden", index, "safetensors").name)
            for name in names:
                path = self.folder / name
                if not path.is_file() or file_sha256(path) != hashes.get(name):
                    return f"{name} is missing or changed since it was written (sha256)"
        return None

    def _drop_layers(self) -> None:
        for pattern in ("layer-*.json", "layer-*.safetensors", "part-*.safetensors", "hidden-*.safetensors"):
            for path in self.folder.glob(pattern):
                path.unlink(missing_ok=True)

    def save_part(self, index: int, first: int, tensors: dict[str, torch.Tensor]) -> None:
        """Store the tensors of layer `index`'s chunk of experts from expert `first` (in the background, as
        `save_layer`); the layer's record, written by `save_layer`, lists its parts."""
        self.flush()
        path = self.folder / f"part-{index:05d}-{first:05d}.safetensors"
        self._pending = self._writer.submit(self._write_part, index, path, tensors)

    def _write_part(self, index: int, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        with disk_errors(f"layer {index} to {self.folder}", self.folder):
            self._create()
            self._parts.setdefault(index, {})[path.name] = self._write_file(path, list(tensors.values()), list(tensors))

    def save_layer(
        self, index: int, tensors: dict[str, torch.Tensor], record: dict, hidden: list[torch.Tensor] | DiskTensors
    ) -> None:
        """Store a finished layer (in the background; the tensors, and the files of `DiskTensors`, must not change
        until the next `save_layer` or `flush`)."""
        self.flush()
        hidden = hidden.entries if isinstance(hidden, DiskTensors) else hidden
        parts = self._parts.pop(index, {})
        record = {**record, "parts": sorted(parts)} if parts else record
        self._pending = self._writer.submit(self._write_layer, index, tensors, record, hidden, parts)

    def flush(self) -> None:
        """Wait for the layer in flight to be stored; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_layer(
        self, index: int, tensors: dict, record: dict, hidden: list[torch.Tensor], parts: dict[str, str]
    ) -> None:
        with disk_errors(f"layer {index} to {self.folder}", self.folder):
            self._create()
            hashes = dict(parts)
            for kind, names, values in (
                ("layer", list(tensors), list(tensors.values())),
                ("hidden", [str(i) for i in range(len(hidden))], hidden),
            ):
                path = self._path(kind, index, "safetensors")
                hashes[path.name] = self._write_file(path, values, names)
            record = {**record, "files": hashes, "job": self.fingerprint}
            self._write_text(self._path("layer", index, "json").name, json.dumps(record))
        for old in self.folder.glob("hidden-*.safetensors"):
            if old.name != self._path("hidden", index, "safetensors").name:
                old.unlink(missing_ok=True)

    def _write_file(self, path: Path, values: list[torch.Tensor], names: list[str]) -> str:
        """`values` as `names` in `path`, written to a temporary name, synced and renamed; its sha256."""
        tmp = path.with_name("." + path.name + ".tmp")
        try:
            write_safetensors(tmp, values, names)
            digest = file_sha256(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def save_json(self, name: str, obj: dict) -> None:
        """`obj` as `name`, then its sha256 as `name.sha256` (a file without its hash counts as absent)."""
        text = json.dumps(obj)
        with disk_errors(f"{name} to {self.folder}", self.folder):
            self._create()
            self._write_text(name, text)
            self._write_text(f"{name}.sha256", hashlib.sha256(text.encode()).hexdigest())

    def load_json(self, name: str) -> dict | None:
        """What `save_json` stored as `name`, or None: absent, or changed since (dropped, with a warning)."""
        path, digest = self.folder / name, self.folder / f"{name}.sha256"
        if not path.is_file():
            return None
        if digest.is_file() and file_sha256(path) == digest.read_text().strip():
            return json.loads(path.read_text())
        log.warning("%s does not match its sha256 (changed or half-written); it is made again", path)
        path.unlink(missing_ok=True)
        digest.unlink(missing_ok=True)
        return None

    def layer_tensors(self, num_layers: int) -> list[StoredTensor]:
        """Every tensor of the `num_layers` finished layers, in layer order, as byte ranges of the layer files;
        an error unless layers 0..num_layers-1 are all stored."""
        self.flush()
        done = self.done()
        if done != list(range(num_layers)):
            missing = sorted(set(range(num_layers)) - set(done))
            raise OutputError(
                f"{self.folder} lacks layer {missing[0] if missing else done[-1]} of the {num_layers} the checkpoint "
                "needs; nothing was written: delete that folder and run the command again."
            )
        files = [
            [self._path("layer", i, "safetensors"), *(self.folder / n for n in self.record(i).get("parts", []))]
            for i in done
        ]
        return [t for paths in files for path in paths for t in read_header(path).values()]

    def scratch(self, name: str) -> Path:
        """A folder for work a rerun redoes anyway (e.g. merged layers between passes): dropped on failure."""
        return self.folder / "scratch" / name

    def kept(self) -> str | None:
        """What a rerun would resume from, in words, or None."""
        done = self.done()
        if done:
            return f"finished layer {done[0]} is" if len(done) == 1 else f"finished layers {done[0]}-{done[-1]} are"
        return "the allocation plan is" if (self.folder / "plan.json").is_file() else None

    def drop_unresumable(self) -> None:
        """After a failure: keep what a rerun resumes from (stored layers, a plan), nothing else."""
        shutil.rmtree(self.folder / "scratch", ignore_errors=True)
        if self.folder.is_dir() and not self.done() and not (self.folder / "plan.json").is_file():
            self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
