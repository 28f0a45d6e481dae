"""Run records: one JSON file per model (`run.json` inside a packed checkpoint), read by `moecompress report`
and the model card. `compress` writes the compression half; every `moecompress eval` adds its results."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import CheckpointError, NonFiniteError

RUN_RECORD = "run.json"
SCHEMA = "moecompress.run/1"


@dataclass
class RunRecord:
    """name: label in reports; model: what was evaluated; base_model: what it was compressed from (None for a base).
    bit_allocation / importance: {"layers": [...], "values": [[per expert]]}, mean code bits and routing share.
    evaluations: {"ppl": {data: {...}}, "lm_eval": {task: {...}}, "vlqa": {data: {...}}, "efficiency": {...}}."""

    name: str
    model: str
    base_model: str | None = None
    recipe: str | None = None
    method: str = "unknown"
    expert_bits_per_param: float | None = None
    compression: dict = field(default_factory=dict)
    bit_allocation: dict | None = None
    importance: dict | None = None
    evaluations: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def size_bytes(self) -> int | None:
        """Bytes of the model's weight files: as measured by `eval efficiency`, else read from its folder."""
        from .efficiency import checkpoint_bytes

        return self.evaluations.get("efficiency", {}).get("checkpoint_bytes") or checkpoint_bytes(self.model) or None


def record_path(location: str | Path) -> Path:
    """`location` itself when it is a .json file, else `<location>/run.json`."""
    path = Path(location).expanduser()
    return path if path.suffix == ".json" else path / RUN_RECORD


def read_record(location: str | Path) -> RunRecord:
    path = record_path(location)
    if not path.is_file():
        raise CheckpointError(
            f"no run record at {path}. `moecompress compress` writes one into its output folder; for any other "
            "model run `moecompress eval ... --record FILE.json` first."
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}).") from exc
    found = data.get("schema") if isinstance(data, dict) else f"a JSON {type(data).__name__}"
    if found != SCHEMA:
        raise CheckpointError(
            f"{path} is not a moecompress run record (found {found!r}, expected schema {SCHEMA!r}); "
            "name a new file or an existing run record."
        )
    return RunRecord.from_dict(data)


def write_record(record: RunRecord, location: str | Path) -> Path:
    """Write atomically (temporary file + rename)."""
    path = record_path(location)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        text = json.dumps(record.to_dict(), indent=1, allow_nan=False)
    except ValueError:
        raise NonFiniteError(f"a result for {path} is NaN or infinite; it was not recorded.") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointError(
            f"cannot write the run record {path} ({exc}); pass --record FILE.json to keep the "
            "results elsewhere, or --no-record."
        ) from exc
    return path


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Exclusive flock on the folder itself (nothing is created): one read-modify-write of a record at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_evaluation(location: str | Path, kind: str, results: dict, new_record: RunRecord | None = None) -> Path:
    """Merge `results` into `evaluations[kind]` of the record at `location` (created from `new_record` if absent);
    processes adding to one record at once each keep their results."""
    path = record_path(location)
    try:
        with _folder_lock(path.parent):
            return _add_evaluation(path, kind, results, new_record)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the run record {path} ({exc}); pass --record FILE.json to keep the results elsewhere, "
            "or --no-record."
        ) from exc


def _add_evaluation(path: Path, kind: str, results: dict, new_record: RunRecord | None) -> Path:
    if path.is_file():
        record = read_record(path)
    elif new_record is not None:
        record = new_record
    else:
        raise CheckpointError(f"no run record at {path} to add {kind} results to.")
    if kind == "efficiency":
        record.evaluations[kind] = results
    else:
        record.evaluations.setdefault(kind, {}).update(results)
    return write_record(record, path)
