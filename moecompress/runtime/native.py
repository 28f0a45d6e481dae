"""Native CPU kernels for packed experts (`csrc/cpu/`): group-wise dequant GEMV straight from the stored
bit streams and a fused MoE layer forward, one native call per layer; and a dense GEMV for the model's unquantized
linear layers at decode (`runtime/native_linear.py`).

The sources are compiled with the system C++ compiler on first use into a cache (`$MOECOMPRESS_CACHE` or
`~/.cache/moecompress/native`, keyed by the sources' hash) and loaded with ctypes: plain C ABI, no torch
headers, so no CUDA torch is needed to build it. Where no compiler is found, or the build fails, the torch
reference path runs and one warning says why. `MOECOMPRESS_KERNELS=torch` forces the reference path.

Activations: on CPUs with AVX-512 VNNI, or AVX2 (2-, 4- and 8-bit codes), the experts run
with their activations quantized to int8 per block of 16 (llama.cpp's q8 scheme; integer dot products, about
0.5 % relative error per projection on Gaussian inputs); other formats and CPUs, and
`MOECOMPRESS_CPU_ACTIVATIONS=fp32`, use float32 activations (exact to float32 rounding).

Layout: each packed format hands the kernels its operand (`QuantFormat.kernel_operand`): the stored rows of
`bits`-wide codes with fp16 scales and uint8 zeros as they are, or a repacking made once per module (base-3 ternary:
2-bit codes, 1.6 -> 2 bits per weight read, for 8-codes-per-instruction SIMD decoding instead of a division chain
per trit).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import uuid
import weakref
from pathlib import Path

import torch

from ..formats import KernelOperand
from ..formats.bitpack import pack_codes, unpack_codes

log = logging.getLogger(__name__)


def kernel_sources() -> Path:
    """The kernel tree: `moecompress/csrc` in an installed wheel, `csrc/` beside the package in a checkout."""
    package = Path(__file__).resolve().parents[1]
    return next((p for p in (package / "csrc", package.parent / "csrc") if p.is_dir()), package / "csrc")


SOURCES = kernel_sources() / "cpu"
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-Wall", "-Wextra"]
# Tokens per call up to which the kernels run (measured on one Qwen3-30B-A3B-shaped layer, 2 cores: 512 tokens
# 0.47 s native vs 1.1 s dequantize + matmul); above it each expert is dequantized once and multiplied.
MAX_TOKENS = 4096
# Tokens per expert up to which the int8-activation kernels run (0: never; eval/check_native_ppl.py measures
# their effect on perplexity, below 4e-4 relative on the reference checkpoints).
INT8_TOKENS = 0 if os.environ.get("MOECOMPRESS_CPU_ACTIVATIONS", "int8") == "fp32" else MAX_TOKENS


class ProjDesc(ctypes.Structure):
    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("row_bytes", ctypes.c_int64),
        ("out_features", ctypes.c_int32),
        ("in_features", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("groups", ctypes.c_int32),
        ("scale_rows", ctypes.c_int32),
        ("fixed_zero", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
        ("bias", ctypes.c_void_p),
    ]


_library: ctypes.CDLL | None = None
_failure: str | None = None


COMMON = SOURCES.parent / "common"  # headers shared with the CUDA kernels


def cached_build(kind: str, name: str, inputs: list[Path], options: list[str], compile_to) -> Path:
    """`$MOECOMPRESS_CACHE/<kind>/<name>-<hash>.so`, keyed by `options` and the files `inputs`, compiled by
    `compile_to(path)` on first use into a temporary name and renamed into place (concurrent builds are safe)."""
    digest = hashlib.sha256(" ".join(options).encode())
    for path in inputs:
        digest.update(path.name.encode() + path.read_bytes())
    cache = Path(os.environ.get("MOECOMPRESS_CACHE", Path.home() / ".cache" / "moecompress")) / kind
    target = cache / f"{name}-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        log.info("compiling the %s expert kernels (once) into %s", kind, target)
        try:
            compile_to(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _build() -> Path:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ('{compiler}') on PATH; install g++ or set CXX")
    sources = sorted(SOURCES.glob("*.cpp"))
    if not sources:
        raise RuntimeError(f"kernel sources in {SOURCES} are missing (install moecompress from its repository)")

    def compile_to(path: Path) -> None:
        result = subprocess.run([compiler, *FLAGS, "-o", str(path), *map(str, sources)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")

    inputs = sorted([*SOURCES.iterdir(), *COMMON.iterdir()])
    return cached_build("native", "moe_gemv", inputs, [compiler, *FLAGS], compile_to)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None (after one warning) where it cannot be had."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    if os.environ.get("MOECOMPRESS_KERNELS", "native") == "torch":
        _failure = "MOECOMPRESS_KERNELS=torch"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError) as exc:
        _failure = str(exc)
        log.warning(
            "moecompress: native CPU kernels unavailable (%s); packed experts run on the slower torch path.", exc
        )
        return None
    check_layout(lib)
    lib.moe_cpu_isa.restype = ctypes.c_int
    lib.moe_q8_fits.argtypes = [ctypes.POINTER(ProjDesc)]
    lib.moe_experts_forward.argtypes = [
        ctypes.POINTER(ProjDesc),
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_int32,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_void_p,
    ]
    lib.moe_packed_linears.argtypes = [
        ctypes.c_int32,
        ctypes.POINTER(ProjDesc),
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int32,
        ctypes.c_void_p,
    ]
    pointer = ctypes.c_void_p
    lib.moe_dense_linears.argtypes = [ctypes.c_int32, *[pointer] * 4, ctypes.c_int32, pointer, ctypes.c_int64, pointer]
    _library = lib
    return lib


def check_layout(lib: ctypes.CDLL) -> None:
    """The library's `ProjDesc` (common/proj_desc.h) has the size, the field names and each field's offset of the
    ctypes mirror here."""
    lib.moe_proj_desc_names.restype = ctypes.c_char_p
    names = lib.moe_proj_desc_names().decode().strip(",").split(",")
    answer = (ctypes.c_int64 * (len(names) + 1))()
    lib.moe_proj_desc_layout(answer)
    theirs = {"size": answer[0], **dict(zip(names, answer[1:]))}
    ours = {"size": ctypes.sizeof(ProjDesc), **{name: getattr(ProjDesc, name).offset for name, _ in ProjDesc._fields_}}
    if theirs != ours:
        raise RuntimeError(f"the kernels' ProjDesc layout {theirs} differs from runtime/native.py's {ours}")


@contextlib.contextmanager
def float32_activations():
    """Float32 activations in the native kernels for the duration (evaluations: exact to float32 rounding)."""
    global INT8_TOKENS
    saved, INT8_TOKENS = INT8_TOKENS, 0
    try:
        yield
    finally:
        INT8_TOKENS = saved


def kernel_name() -> str:
    """Which path CPU packed experts take: native-avx512-vnni or native-avx2 (with int8 or fp32 activations),
    native-avx512, native-portable, or torch (with the reason)."""
    lib = library()
    if lib is None:
        return f"torch ({_failure})"
    isa = lib.moe_cpu_isa()
    if isa == 4:
        return "native-avx512-vnni (int8 activations)" if INT8_TOKENS else "native-avx512 (fp32 activations)"
    if isa == 2:
        return "native-avx2 (int8 activations)" if INT8_TOKENS else "native-avx2 (fp32 activations)"
    return {3: "native-avx512", 1: "native-portable"}[isa]


def describe(linear) -> tuple[ProjDesc, list[torch.Tensor]]:
    """The kernel's view of a `PackedLinear` (and the tensors it points into, to keep alive)."""
    out_features, in_features, fmt = linear.out_features, linear.in_features, linear.fmt
    op = fmt.kernel_operand(linear.stored_tensors(), in_features)
    if op.bits == 3 and library().moe_cpu_isa() == 2 and INT8_TOKENS:
        op = widened(op, in_features)
    bias = None if getattr(linear, "bias", None) is None else linear.bias.to(torch.float32).contiguous()
    desc = ProjDesc(
        op.codes.data_ptr(),
        op.scale.data_ptr(),
        op.zero.data_ptr() if op.zero is not None else None,
        op.codes.shape[1] * op.codes.element_size(),
        out_features,
        in_features,
        op.bits,
        fmt.effective_group(in_features),
        fmt.groups(in_features),
        fmt.scale_rows(out_features),
        op.fixed_zero,
        0,
        bias.data_ptr() if bias is not None else None,
    )
    return desc, [t for t in (op.codes, op.scale, op.zero, bias) if t is not None]


def widened(op: KernelOperand, in_features: int) -> KernelOperand:
    """3-bit codes repacked as 4-bit ones, for AVX2 CPUs: their int8 kernels decode no 3-bit rows (AVX-512 spreads
    them with VBMI's byte permute), and the float32 kernels they would take instead are several times slower than
    the third more bytes read (an LP mix of 2-, 3- and 4-bit experts decodes at the speed of its bytes)."""
    codes = unpack_codes(op.codes.view(torch.int32), 3, in_features)
    return dataclasses.replace(op, codes=pack_codes(codes, 4), bits=4)


def int8_fits(linear) -> bool:
    """Whether this CPU runs `linear` (a `PackedLinear`) with int8 activations (its bits, group and ISA)."""
    desc, keep = describe(linear)
    fits = bool(library().moe_q8_fits(ctypes.byref(desc)))
    del keep
    return fits


def packed_linear(linear, x: torch.Tensor, int8: bool = False, desc: ProjDesc | None = None) -> torch.Tensor:
    """x [..., in] W^T through the native GEMV (float32 activations, or int8 where `int8` and the CPU allow);
    `desc`: `linear`'s descriptor made before (`LinearTable`), else made now."""
    keep = None
    if desc is None:
        desc, keep = describe(linear)
    y = packed_linears([linear], x, int8, [desc])[0]
    del keep
    return y


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] W^T (+ bias) for a contiguous float32 or bfloat16 `weight` [out, in] on the CPU, through the native
    dense GEMV (float32 activations and sums); the result in x's dtype."""
    return dense_linears([weight], [bias], x)[0].to(x.dtype)


def _pointers(values) -> ctypes.Array:
    return (ctypes.c_void_p * len(values))(*values)


def _descs(descs: list[ProjDesc]):
    """`descs` as the C array the kernels take (one by reference: a single call per linear pays no array copy)."""
    return ctypes.byref(descs[0]) if len(descs) == 1 else (ProjDesc * len(descs))(*descs)


def packed_linears(linears: list, x: torch.Tensor, int8: bool, descs: list[ProjDesc]) -> list[torch.Tensor]:
    """x [..., in] W_i^T for packed linears sharing x (their descriptors `descs`), in one native call: the activations
    quantized once, the rows of all of them in one parallel loop."""
    flat = _as(x, torch.float32)
    ys = [torch.empty(*x.shape[:-1], linear.out_features) for linear in linears]
    tokens = flat.numel() // linears[0].in_features
    library().moe_packed_linears(
        len(descs), _descs(descs), flat.data_ptr(), tokens, int8, _pointers([y.data_ptr() for y in ys])
    )
    return ys


def dense_linears(weights: list[torch.Tensor], biases: list, x: torch.Tensor) -> list[torch.Tensor]:
    """x [..., in] W_i^T (+ bias_i) for contiguous float32 or bfloat16 weights sharing x, in one native call; the results in float32."""
    flat = _as(x.reshape(-1, x.shape[-1]), torch.float32)
    bs = [None if b is None else _as(b, torch.float32) for b in biases]
    ys = [torch.empty(*x.shape[:-1], w.shape[0]) for w in weights]
    library().moe_dense_linears(
        len(weights),
        _pointers([w.data_ptr() for w in weights]),
        (ctypes.c_int32 * len(weights))(*[int(w.dtype == torch.bfloat16) for w in weights]),
        _pointers([None if b is None else b.data_ptr() for b in bs]),
        (ctypes.c_int32 * len(weights))(*[w.shape[0] for w in weights]),
        x.shape[-1],
        flat.data_ptr(),
        flat.shape[0],
        _pointers([y.data_ptr() for y in ys]),
    )
    return ys


class LinearTable:
    """Descriptors of every packed matrix inside a module (a `FactoredExperts`), made once: describing them on every
    call took an eighth of a factored layer's decode time."""

    def __init__(self, module):
        self.described = {id(m): describe(m) for m in module.modules() if hasattr(m, "weight_packed")}

    def linear(self, linear, x: torch.Tensor, int8: bool) -> torch.Tensor:
        return packed_linear(linear, x, int8, self.described[id(linear)][0])


def activation_spec(activation) -> tuple[int, float, float] | None:
    """(kind, alpha, limit) of a gated activation the fused forward computes (`kernel_spec()`), or None."""
    spec = getattr(activation, "kernel_spec", None)
    return spec() if spec is not None else None


class ExpertTable:
    """Descriptors of every projection of a `PackedExperts` (gate, up, down per expert), built once."""

    def __init__(self, experts):
        described = [describe(getattr(e, p)) for e in experts for p in ("gate_proj", "up_proj", "down_proj")]
        self.array = (ProjDesc * len(described))(*(d for d, _ in described))
        self.keep = [t for _, ts in described for t in ts]
        self.num_experts, self.hidden, self.intermediate = len(experts), experts.hidden_size, experts.intermediate_size
        self.activation = activation_spec(experts.activation)

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        x, ids, weights = _as(hidden, torch.float32), _as(top_k_index, torch.int64), _as(top_k_weights, torch.float32)
        out = torch.empty(x.shape)
        library().moe_experts_forward(
            self.array,
            self.num_experts,
            x.data_ptr(),
            ids.data_ptr(),
            weights.data_ptr(),
            x.shape[0],
            ids.shape[1],
            self.hidden,
            self.intermediate,
            INT8_TOKENS,
            *self.activation,
            out.data_ptr(),
        )
        return out if hidden.dtype == torch.float32 else out.to(hidden.dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`, contiguous (itself where it is: a decode step calls this per layer, and a copy costs)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


class TableCache:
    """Kernel tables per `PackedExperts` module, built by `build(module)` and rebuilt when packed weights were
    replaced since (`epoch`); dropped when the module's buffers move."""

    def __init__(self, build):
        self.build, self.tables = build, weakref.WeakKeyDictionary()  # module -> (epoch, table)

    def get(self, experts, epoch: int):
        cached = self.tables.get(experts)
        if cached is None or cached[0] != epoch:
            cached = self.tables[experts] = (epoch, self.build(experts))
        return cached[1]

    def drop(self, experts) -> None:
        self.tables.pop(experts, None)


_tables = TableCache(ExpertTable)
table_for, drop_table = _tables.get, _tables.drop
_linear_tables = TableCache(LinearTable)
linear_table_for, drop_linear_table = _linear_tables.get, _linear_tables.drop
