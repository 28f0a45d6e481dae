"""Where moecompress writes, and how it never destroys what it did not create.

An output path (`-o`) must be new, an empty folder, or an earlier moecompress output (a folder holding our
marker file, or a checkpoint manifest); replacing an earlier output needs `overwrite=True`. Outputs are never
the source, inside it, above it, or above the working directory. A writer holds an exclusive lock
(`.<name>.lock` beside the output, removed when done) for the whole job, so a second run on the same path is
refused; the folder is built as `.<name>.tmp-*` and renamed into place. Leftovers of a killed run (`.tmp-*`,
and an `.old-*` backup of the previous output) are cleaned, or restored, by the next run that takes the lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputError
from .tensorfiles import file_size_limit

MARKER = ".moecompress-output"
MANIFEST = "moecompress.json"

_held: dict[Path, int] = {}  # outputs this process has claimed (claims nest: the CLI claims, the writer claims again)


def is_moecompress_output(folder: Path) -> bool:
    """A folder moecompress wrote: our marker, or a checkpoint manifest (checkpoints from before the marker)."""
    return (folder / MARKER).is_file() or (folder / MANIFEST).is_file()


def _local(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p.resolve() if p.exists() else None


NAME_MAX = 255  # bytes in one path component on Linux file systems


def check_output(path: str | Path, sources: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """The resolved output path, or an `OutputError` naming why writing there could destroy data."""
    out = Path(path).expanduser().resolve()
    for source in filter(None, map(_local, sources)):
        if out == source:
            raise OutputError(f"output '{path}' is the input '{source}'; choose a new path for the output.")
        if source in out.parents:
            raise OutputError(f"output '{path}' is inside the input '{source}'; choose a path outside it.")
        if out in source.parents:
            raise OutputError(f"output '{path}' contains the input '{source}'; choose a new path for the output.")
    size = len(out.name.encode())
    if size + len(".recovery-state") > NAME_MAX:  # the longest name moecompress derives from the output's
        raise OutputError(
            f"output name '{out.name[:40]}...' has {size} bytes; moecompress needs names up to "
            f"{NAME_MAX - len('.recovery-state')} (resume folders such as '<name>.recovery-state' go beside it): choose a shorter one."
        )
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise OutputError(f"output '{path}' is the working directory or above it; choose a new folder, e.g. out/NAME.")
    if out.exists():
        if not out.is_dir():
            raise OutputError(
                f"output '{path}' is an existing file; choose a new folder path (the file is left alone)."
            )
        if any(out.iterdir()):
            if not is_moecompress_output(out):
                raise OutputError(
                    f"output '{path}' exists and holds files that moecompress did not write; "
                    "choose a new path (nothing there was touched)."
                )
            if not overwrite:
                raise OutputError(
                    f"output '{path}' holds an earlier moecompress output; pass --overwrite to replace "
                    "it, or choose a new path."
                )
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output '{path}': '{parent}' is not a writable folder; choose another path.")
    return out


def check_file_output(path: str | Path, what: str) -> Path:
    """A file the user named for us to (over)write, e.g. --json: its folder must exist and be writable."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise OutputError(f"{what} '{path}' is a folder; name a file, e.g. {Path(path) / 'result.json'}.")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} '{path}': the folder '{out.parent}' does not exist or is not writable.")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputError(f"{what} '{path}' is not writable; choose another file.")
    return out


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file by temporary sibling + rename, so a reader never sees half of it."""
    path = Path(path).expanduser()
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def disk_errors(what: str, kept: Path | None = None, sharded: bool = False) -> Iterator[None]:
    """Turn a failed write (disk full, quota, file-size limit, permissions) into an `OutputError` naming it;
    `sharded`: the files written are checkpoint shards (--max-shard-size sets their size)."""
    try:
        yield
    except OSError as exc:
        limit = file_size_limit()
        fixes = {
            errno.ENOSPC: "the disk is full; free space",
            errno.EDQUOT: "the disk quota is used up; free space",
            errno.EFBIG: "a file would exceed the file-size limit"
            + (f" of {limit} bytes (ulimit -f)" if limit is not None else " (ulimit -f, or the file system's)")
            + ("; lower --max-shard-size below it or raise the limit" if sharded else "; raise the limit"),
        }
        why = fixes.get(exc.errno, f"{exc}; fix the cause")
        keep = f" Finished layers are kept in {kept}: rerun the same command to resume." if kept is not None else ""
        raise OutputError(f"could not write {what}: {why} and rerun.{keep}") from exc


def _lock(out: Path) -> int:
    """Exclusive flock on `.<name>.lock`; retried if the lock file was replaced while we waited for it."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise OutputError(
                    f"another moecompress run is writing '{out}' (lock {lock_path}); wait for it to "
                    "finish or choose another output path."
                ) from None
            raise
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _clean_stale(out: Path) -> None:
    """Remove our temporary folders left by a killed run; put back a previous output that a killed
    replace left as `.old-*`."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    backups = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and not out.exists():
        os.replace(backups.pop(), out)
    for old in backups:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def claim_output(
    path: str | Path, sources: Iterable[str | Path | None] = (), overwrite: bool = False
) -> Iterator[Path]:
    """Check `path` (see `check_output`) and hold the output lock for the duration; yields the resolved path.
    Folders created above the output are removed again if no output appears."""
    out = check_output(path, sources, overwrite)
    if out in _held:
        yield out
        return
    created = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = None
    try:
        fd = _lock(out)
        _held[out] = fd
        check_output(path, sources, overwrite)  # again, now that no other writer can change it
        _clean_stale(out)
        yield out
    finally:
        if fd is not None:
            _held.pop(out, None)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out.parent / f".{out.name}.lock")
            os.close(fd)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: nothing of the user's is removed


@contextlib.contextmanager
def atomic_folder(
    output: str | Path, sources: Iterable[str | Path | None] = (), overwrite: bool = False, kind: str = "output"
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `output`; on success it replaces `output` (marked as ours), on
    error or interrupt it is removed and `output` is left as it was."""
    with claim_output(output, sources, overwrite) as out:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            (tmp / MARKER).write_text(json.dumps({"written_by": "moecompress", "kind": kind}) + "\n")
            backup = None
            if out.exists():
                backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(out, backup)
            os.replace(tmp, out)
            if backup is not None:
                shutil.rmtree(backup)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
