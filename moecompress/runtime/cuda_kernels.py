"""GPU paths for packed experts: the CUDA decode kernels (`csrc/cuda/moe_gemv.cu`, up to 8 tokens per call)
and the Triton grouped GEMM (`triton_moe.py`, more tokens), both reading the modules' own packed tensors through
per-expert tables of addresses and formats made once per module (`GpuExperts`; no weight is copied, except
base-3 ternary rows, repacked to 2-bit codes).

The CUDA source is plain CUDA C++ with a C ABI: it is compiled by nvcc on first use for the device's
architecture into a cache (`$MOECOMPRESS_CACHE` or `~/.cache/moecompress/cuda`, keyed by the sources' hash and
the architecture) and called through ctypes on `torch.cuda.current_stream()`. Without nvcc the Triton kernel
runs every call; without Triton either, the torch reference path, with one warning. `compile_check` builds the
sources for sm_80 and sm_90a with warnings as errors (CI runs it: `python -m moecompress.runtime.cuda_kernels`).
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .native import ProjDesc, TableCache, cached_build, kernel_sources

log = logging.getLogger(__name__)

SOURCES = kernel_sources() / "cuda"
HEADERS = kernel_sources() / "common"
FLAGS = ["-O3", "-std=c++17", "--shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall", "-Werror", "all-warnings"]
CHECK_ARCHS = ("80", "90a")
DECODE_TOKENS = 8  # tokens per call up to which the CUDA decode kernels run; the Triton GEMM above
CUDA_TOKENS = 4096  # tokens per launch of the decode kernels when they run larger calls (no Triton)

_library: ctypes.CDLL | None = None
_failure: str | None = None


def nvcc_command(target: Path, archs: tuple[str, ...]) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return ["nvcc", *FLAGS, *gencode, "-o", str(target), *map(str, sorted(SOURCES.glob("*.cu")))]


def _run_nvcc(target: Path, archs: tuple[str, ...]) -> None:
    if shutil.which("nvcc") is None:
        raise RuntimeError("no CUDA compiler (nvcc) on PATH; install the CUDA toolkit")
    result = subprocess.run(nvcc_command(target, archs), capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"nvcc failed: {(result.stderr or result.stdout).strip()[-2000:]}")


def compile_check(archs: tuple[str, ...] = CHECK_ARCHS) -> None:
    """Build every CUDA source for `archs` (warnings are errors) into a scratch folder; raise on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        _run_nvcc(Path(tmp) / "check.so", archs)


def _device_arch() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}" + ("a" if major >= 9 else "")


def _build() -> Path:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    arch = _device_arch()
    inputs = sorted([*SOURCES.iterdir(), *HEADERS.iterdir()])
    return cached_build("cuda", f"moe_gemv-sm{arch}", inputs, [*FLAGS, arch], lambda path: _run_nvcc(path, (arch,)))


def library() -> ctypes.CDLL | None:
    """The CUDA kernel library, built on first use; None (after one warning) where it cannot be had."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError) as exc:
        _failure = str(exc)
        log.warning("moecompress: CUDA expert kernels unavailable (%s); the Triton GEMM runs every call.", exc)
        return None
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.moe_cuda_experts_forward.argtypes = [ptr, i32, ptr, ptr, ptr, i32, i32, i32, i32, ptr, ptr, ptr]
    lib.moe_cuda_experts_forward.restype = i32
    lib.moe_cuda_linear.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, ptr, ptr]
    lib.moe_cuda_linear.restype = i32
    _library = lib
    return lib


def triton_available() -> bool:
    try:
        from . import triton_moe  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_name() -> str:
    """Which code runs packed experts on CUDA devices."""
    cuda = library() is not None
    if triton_available():
        return ("cuda decode (<= 8 tokens) + " if cuda else "") + "triton grouped GEMM"
    return "cuda decode" if cuda else f"torch (no Triton; {_failure})"


class GpuExperts:
    """The packed experts of one module on its CUDA device: per projection type a table of the experts'
    tensors and formats (Triton), and the same as kernel descriptors (CUDA decode kernels)."""

    def __init__(self, experts):
        from .triton_moe import ProjectionTable

        device = next(experts.buffers()).device
        self.tables = tuple(
            ProjectionTable.build([getattr(e, p) for e in experts]) for p in ("gate_proj", "up_proj", "down_proj")
        )
        descs = [self._desc(t, e) for e in range(len(experts)) for t in self.tables]
        array = (ProjDesc * len(descs))(*descs)
        self.descs = torch.frombuffer(bytearray(array), dtype=torch.uint8).to(device)
        self.num_experts, self.hidden, self.intermediate = len(experts), experts.hidden_size, experts.intermediate_size

    @staticmethod
    def _desc(table, e: int) -> ProjDesc:
        w_ptr, row_bytes, bits, group, groups, s_ptr, s_rowstride, z_ptr, fixed_zero = table.meta[e].tolist()
        return ProjDesc(
            w_ptr,
            s_ptr,
            z_ptr or None,
            row_bytes,
            table.out_features,
            table.in_features,
            bits,
            group,
            groups,
            1 if s_rowstride == 0 else table.out_features,
            fixed_zero,
            0,
            None,
        )

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        lib = library()
        if lib is None or (hidden.shape[0] > DECODE_TOKENS and triton_available()):
            from .triton_moe import experts_forward

            return experts_forward(self.tables, hidden, top_k_index, top_k_weights)
        if hidden.shape[0] > CUDA_TOKENS:  # no Triton: the decode kernels, a grid row per (token, slot) pair
            parts = zip(hidden.split(CUDA_TOKENS), top_k_index.split(CUDA_TOKENS), top_k_weights.split(CUDA_TOKENS))
            return torch.cat([self.forward(*part) for part in parts])
        tokens, top_k = top_k_index.shape
        x = hidden.to(torch.float32).contiguous()
        ids = top_k_index.to(torch.int64).contiguous()
        weights = top_k_weights.to(torch.float32).contiguous()
        h = torch.empty(tokens * top_k, self.intermediate, dtype=torch.float32, device=x.device)
        out = torch.empty_like(x)
        status = lib.moe_cuda_experts_forward(
            self.descs.data_ptr(),
            self.num_experts,
            x.data_ptr(),
            ids.data_ptr(),
            weights.data_ptr(),
            tokens,
            top_k,
            self.hidden,
            self.intermediate,
            h.data_ptr(),
            out.data_ptr(),
            torch.cuda.current_stream(x.device).cuda_stream,
        )
        if status:
            raise RuntimeError(f"CUDA expert kernels failed to launch (cudaError {status})")
        return out.to(hidden.dtype)


_tables = TableCache(GpuExperts)
table_for, drop_table = _tables.get, _tables.drop


if __name__ == "__main__":  # CI: every CUDA source builds for sm_80 and sm_90a
    try:
        compile_check()
    except RuntimeError as exc:
        print(f"CUDA compile check failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(
        f"CUDA sources build for {', '.join('sm_' + a for a in CHECK_ARCHS)}: {nvcc_command(Path('lib.so'), CHECK_ARCHS)}"
    )
