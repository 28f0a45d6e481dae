"""The resumable state of a streamed `compress`: `<output>.compress-state/`.

Per finished decoder layer: its output tensors (`layer-00012.safetensors`, exactly as the checkpoint stores
them), the calibration activations leaving it (`hidden-00012.safetensors`, only the newest kept) and its record
(`layer-00012.json`, written last: a layer counts as done once its record exists). Every file is written to a
temporary name, synced and renamed, so a kill at any moment leaves either the old state or the new one. A run
started again with the same job fingerprint (recipe, source files, plan) resumes after the last done layer; any
other job is refused. The final checkpoint's shards are assembled from the layer files by byte copy.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import OutputError
from .outputs import disk_errors
from .tensorfiles import DiskTensors, StoredTensor, read_header, write_safetensors

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
        """(first layer to do, its calibration inputs, read from disk one at a time), or None to start at layer 0."""
        done = self.done()
        if not done:
            return None
        return done[-1] + 1, DiskTensors.of_file(self._path("hidden", done[-1], "safetensors"))

    def save_layer(
        self, index: int, tensors: dict[str, torch.Tensor], record: dict, hidden: list[torch.Tensor] | DiskTensors
    ) -> None:
        """Store a finished layer (in the background; the tensors, and the files of `DiskTensors`, must not change
        until the next `save_layer` or `flush`)."""
        self.flush()
        hidden = hidden.entries if isinstance(hidden, DiskTensors) else hidden
        self._pending = self._writer.submit(self._write_layer, index, tensors, record, hidden)

    def flush(self) -> None:
        """Wait for the layer in flight to be stored; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_layer(self, index: int, tensors: dict, record: dict, hidden: list[torch.Tensor]) -> None:
        with disk_errors(f"layer {index} to {self.folder}", self.folder):
            self._create()
            for kind, names, values in (
                ("layer", list(tensors), list(tensors.values())),
                ("hidden", [str(i) for i in range(len(hidden))], hidden),
            ):
                path = self._path(kind, index, "safetensors")
                tmp = path.with_name("." + path.name + ".tmp")
                try:
                    write_safetensors(tmp, values, names)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            self._write_text(self._path("layer", index, "json").name, json.dumps(record))
        for old in self.folder.glob("hidden-*.safetensors"):
            if old.name != self._path("hidden", index, "safetensors").name:
                old.unlink(missing_ok=True)

    def save_json(self, name: str, obj: dict) -> None:
        with disk_errors(f"{name} to {self.folder}", self.folder):
            self._create()
            self._write_text(name, json.dumps(obj))

    def load_json(self, name: str) -> dict | None:
        path = self.folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    def layer_tensors(self) -> list[StoredTensor]:
        """Every tensor of every finished layer, in layer order, as byte ranges of the layer files."""
        self.flush()
        return [t for i in self.done() for t in read_header(self._path("layer", i, "safetensors")).values()]

    def scratch(self, name: str) -> Path:
        """A folder for work a rerun redoes anyway (e.g. merged layers between passes): dropped on failure."""
        return self.folder / "scratch" / name

    def drop_unresumable(self) -> None:
        """After a failure: keep what a rerun resumes from (stored layers, a plan), nothing else."""
        shutil.rmtree(self.folder / "scratch", ignore_errors=True)
        if self.folder.is_dir() and not self.done() and not (self.folder / "plan.json").is_file():
            self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
