"""Expert-parallel ranks on torch.distributed: `torchrun --nproc-per-node N -m moecompress compress ...` (or
`accelerate launch`, or `moecompress compress --ranks N`, which starts the N processes itself). Every rank walks
the same calibration data through the same layers; each observes and quantizes its share of every layer's routed
experts (`Ranks.share`), and the ranks exchange what the others need: the experts' outputs (so every rank enters
the next layer with the same activations), per-expert statistics, and the packed tensors rank 0 writes.

The exchanges that the written tensors depend on are exact: ranks contribute disjoint rows (the others add zeros),
so a sum over ranks is each row's own value, and the tensors are bit for bit what one process computes (at the same
threads per process). Only the block's summed output norm, a statistic, is summed in another order."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoECompressError, RecipeError

BACKENDS = ("gloo", "nccl", "mpi", "ucc", "xccl")


class RankLostError(MoECompressError):
    """Another rank of a distributed job ended (killed, crashed, out of memory) while this one waited for it."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the job's ranks (one rank: nothing is exchanged)."""

    rank: int = 0
    size: int = 1

    @property
    def multi(self) -> bool:
        return self.size > 1

    @property
    def first(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's contiguous share of `count` experts; the ranks' shares differ by one at most."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def summed(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks (in place; returned). Exact where each element is non-zero on one rank."""
        if self.multi:
            wide = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()
            if torch.distributed.get_backend() == "nccl" and not wide.is_cuda:
                wide = wide.cuda()
            _collective(torch.distributed.all_reduce, wide)
            if wide is not tensor:
                tensor.copy_(wide)
        return tensor

    def gathered(self, obj) -> list:
        """`obj` of every rank, in rank order (picklable objects)."""
        if not self.multi:
            return [obj]
        out = [None] * self.size
        _collective(torch.distributed.all_gather_object, out, obj)
        return out

    def from_first(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.multi:
            return obj
        box = [obj]
        _collective(torch.distributed.broadcast_object_list, box, 0)
        return box[0]

    def to_first(self, obj, receive) -> None:
        """Hand each rank's `obj` to rank 0, one rank after the other: rank 0 calls `receive(obj)` for its own and then
        for each other rank's (so it never holds more than two ranks' at once)."""
        if self.first:
            receive(obj)
        for source in range(1, self.size):
            box = [obj if self.rank == source else None]
            if self.rank == source:
                _collective(torch.distributed.send_object_list, box, 0)
            elif self.first:
                _collective(torch.distributed.recv_object_list, box, source)
                receive(box[0])


def _collective(fn, *args) -> None:
    try:
        fn(*args)
    except RuntimeError as exc:  # gloo: "Connection closed by peer", nccl: DistBackendError (a RuntimeError)
        raise RankLostError(
            f"another rank of the job ended while this one waited for it ({' '.join(str(exc).split())[:160]})"
        ) from None


_CURRENT = Ranks()


def current() -> Ranks:
    """The ranks of this process's job: joined by `join`, else one rank."""
    return _CURRENT


def launched_size() -> int:
    """The rank count a launcher (torchrun, accelerate, `--ranks`) gave this process through WORLD_SIZE (1: none)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        raise RecipeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a rank count; unset it or fix the launch."
        ) from None


def local_ranks() -> int:
    """The ranks of this job on this machine (they share its memory)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE") or 1), 1) if launched_size() > 1 else 1


def default_backend(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def backend_problem(backend: str, device: str) -> str | None:
    """Why `backend` cannot run this job on `device` (None: it can)."""
    if backend not in BACKENDS:
        return f"--backend {backend}: use one of {list(BACKENDS)}"
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed; install a torch wheel that has it, or run on one rank"
    if not torch.distributed.is_backend_available(backend):
        return (
            f"this torch build has no {backend} backend for torch.distributed; "
            f"use --backend {default_backend('cpu')} (CPU) or install a torch build with {backend}"
        )
    if backend == "nccl" and not str(device).startswith("cuda"):
        return "the nccl backend needs --device cuda (one GPU per rank); use --backend gloo on CPU"
    return None


def join(device: str = "cpu", backend: str | None = None) -> Ranks:
    """Join the job a launcher started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) on `backend`
    (default: nccl for cuda, gloo otherwise); with `--device cuda` each rank takes GPU LOCAL_RANK. One rank: nothing to
    join. Refused in one line when the backend is missing."""
    global _CURRENT
    size = launched_size()
    if size == 1 or _CURRENT.multi:
        return _CURRENT
    backend = backend or os.environ.get("MOECOMPRESS_BACKEND") or default_backend(device)
    problem = backend_problem(backend, device)
    if problem is not None:
        raise RecipeError(problem)
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    _CURRENT = Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return _CURRENT


LAUNCHED = "MOECOMPRESS_LAUNCHED"  # set in the processes `spawn` starts: they leave explaining a failure to it
LOST = 3  # exit status of a launched rank whose peer ended first (the launcher names the one that failed)
STOPPED = 143  # exit status of a launched rank the launcher stopped


def launched() -> bool:
    return os.environ.get(LAUNCHED) == "1"


def spawn(argv: list[str], size: int, logs: Path, backend: str) -> list[int]:
    """Run `python -m moecompress argv` as ranks 0..size-1 of one job on this machine (the environment torchrun
    gives, threads split between the ranks unless OMP_NUM_THREADS is set) and wait for them; as soon as one fails,
    stop the others. Rank 0 writes to this process's terminal, the others' stderr to `logs/rank-N.log`. Returns each
    rank's exit status (negative: the signal that ended it)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {"WORLD_SIZE": str(size), "LOCAL_WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1"}
    base.update(MASTER_PORT=str(port), MOECOMPRESS_BACKEND=backend, **{LAUNCHED: "1"})
    base["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // size))
    procs, files = [], []
    try:
        for rank in range(size):
            env = {**os.environ, **base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            if rank:
                files.append(open(logs / f"rank-{rank}.log", "w"))  # noqa: SIM115 (closed below)
            out, err = (None, None) if rank == 0 else (subprocess.DEVNULL, files[-1])
            procs.append(
                subprocess.Popen([sys.executable, "-m", "moecompress", *argv], env=env, stdout=out, stderr=err)
            )
        return _wait(procs)
    finally:
        for proc in procs:  # Ctrl-C or a failure to start one: none is left behind
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        for file in files:
            file.close()


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    codes: list[int | None] = [None] * len(procs)
    while None in codes:
        codes = [proc.poll() for proc in procs]
        if any(code not in (None, 0) for code in codes):
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            return [proc.wait() for proc in procs]
        time.sleep(0.1)
    return codes


def failed_rank(codes: list[int]) -> int | None:
    """The rank whose failure ended a job (not one that only lost its peer or was stopped), or None."""
    return next((r for r, c in enumerate(codes) if c not in (0, LOST, STOPPED, -signal.SIGTERM)), None)
