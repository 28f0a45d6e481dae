"""Packed formats: one class per family, registered by name, that owns everything about its stored form.

A format is a frozen value (bits, group size, symmetry) whose class says how its codes are stored (`pack`,
`unpack`, the stored tensors and their shapes), what it costs (`code_bits`, `overhead_bits`), how its grid is
chosen (`group_params`, `matrix_scales`), what it hands the CPU / CUDA / Triton kernels (`kernel_operand`) and which
exports can hold it (`exports`). Callers never branch on the family: they ask the format.

    @register_format
    class MyFormat(QuantFormat):
        family = "my-format"
        ...

`QuantFormat.from_dict` finds the class again from the dict `to_dict` wrote (the checkpoint's
`quantization_config.formats`); families of moecompress <= 0.6 are named by their keys, newer ones by "format".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .qtensor import SCALE_DTYPE, QTensor, dequantize_codes

SUPPORTED_BITS = (2, 3, 4, 8)
# Allocation/plan key of the ternary formats (integer formats are keyed by their bit width).
TERNARY = "ternary"
FORMATS: dict[str, type[QuantFormat]] = {}


def register_format(cls: type[QuantFormat]) -> type[QuantFormat]:
    """Class decorator: make `cls` a format family that `from_dict`, recipes and checkpoints can name."""
    if cls.family in FORMATS:
        raise ValueError(f"format family '{cls.family}' is registered twice")
    FORMATS[cls.family] = cls
    return cls


@dataclass
class PackedTensor:
    """The stored form of a QTensor: its format's tensors by name (`weight_packed`, `weight_scale`, ...)."""

    tensors: dict[str, torch.Tensor]
    shape: tuple[int, int]
    fmt: QuantFormat

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class KernelOperand:
    """What the kernels read of one packed matrix (`ProjDesc`, csrc/common/proj_desc.h): rows of `bits`-wide codes
    (`codes`, the stored tensor or a repacked copy), fp16 scales, uint8 zero points or none (`fixed_zero` then)."""

    codes: torch.Tensor
    bits: int
    scale: torch.Tensor
    zero: torch.Tensor | None
    fixed_zero: int


@dataclass(frozen=True)
class QuantFormat:
    """Group-wise format: w ~= scale[g] * (code - zero[g]) with integer codes in [0, maxq].

    group_size: columns per scale; -1 one group per row (per output channel); 0 one scale for the whole matrix
    (families with `tensor_scale`)."""

    bits: int
    group_size: int = 128
    sym: bool = False

    family: ClassVar[str] = ""
    key_name: ClassVar[str | None] = None  # allocation key of the family (None: the bit width)
    tensor_scale: ClassVar[bool] = False  # group_size 0 allowed
    # The keys that named the family in moecompress <= 0.6 checkpoints (None: a newer family, named by "format")
    legacy_keys: ClassVar[dict | None] = None
    exports: ClassVar[frozenset[str]] = frozenset()  # `moecompress export --format` targets that hold it
    kernels: ClassVar[bool] = True  # the CPU / CUDA / Triton kernels read it (`kernel_operand`)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size < -1 or (self.group_size == 0 and not self.tensor_scale):
            raise ValueError(
                f"group_size={self.group_size}: use a positive size or -1 for one group per row"
                + (" (0, one scale per tensor, is for ternary only)" if self.group_size == 0 else "")
            )

    # --- what it is -------------------------------------------------------------------------------------------
    @property
    def key(self) -> int | str:
        """How plans and allocation candidates name this format: its bit width, or its family's key."""
        return self.key_name or self.bits

    @property
    def name(self) -> str:
        raise NotImplementedError

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def code_bits(self) -> float:
        """Storage bits per weight of the codes alone."""
        return float(self.bits)

    @property
    def zero_bits(self) -> int:
        """Stored bits of one group's zero point (0: none stored, `fixed_zero` instead)."""
        return 8

    @property
    def fixed_zero(self) -> int:
        """The zero point of every group where none is stored."""
        return 2 ** (self.bits - 1)

    def overhead_bits(self, in_features: int) -> float:
        """Storage bits per weight of the scales (fp16) and stored zeros."""
        if self.group_size == 0:
            return 0.0
        return (16 + self.zero_bits) / self.effective_group(in_features)

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size <= 0 else -(-in_features // self.group_size)

    def scale_rows(self, out_features: int) -> int:
        return 1 if self.group_size == 0 else out_features

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size <= 0 else self.group_size

    # --- (de)serialization ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        names = {"format": self.family} if self.legacy_keys is None else self.legacy_keys
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, **names}

    @staticmethod
    def from_dict(d: dict) -> QuantFormat:
        return format_class(d)(int(d["bits"]), int(d["group_size"]), bool(d["sym"]))

    # --- the grid ---------------------------------------------------------------------------------------------
    def group_params(self, w: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row float32 scale (rounded through fp16) and integer zero for the columns of `w` [rows, cols] (one
        group), shrunk by `clip`."""
        w = w.to(torch.float32)
        xmin = torch.clamp(w.min(dim=1).values, max=0.0) * clip
        xmax = torch.clamp(w.max(dim=1).values, min=0.0) * clip
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        flat = (xmax - xmin) == 0
        xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
        xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
        scale = ((xmax - xmin) / self.maxq).to(SCALE_DTYPE).to(torch.float32)
        scale = torch.clamp(scale, min=torch.finfo(SCALE_DTYPE).tiny)
        if self.sym:
            zero = torch.full_like(scale, self.fixed_zero)
        else:
            zero = torch.clamp(torch.round(-xmin / scale), 0, self.maxq)
        return scale, zero

    def dequantize(self, qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_codes(qt.codes, qt.scales, qt.zeros, self.effective_group(qt.shape[1]), dtype)

    @classmethod
    def widths(cls) -> tuple[int, ...]:
        """The bit widths of this family (`for_bits`)."""
        return SUPPORTED_BITS

    @classmethod
    def for_bits(cls, bits: int, group_size: int, sym: bool) -> QuantFormat:
        """This family's format at `bits` (what an allocation candidate of that width becomes)."""
        return cls(bits, group_size, sym)

    @property
    def span(self) -> int:
        """Columns whose grid is chosen at once by `span_params` (0: each group by `group_params`)."""
        return 0

    def matrix_scales(self, w: torch.Tensor, method: str) -> torch.Tensor | None:
        """Scales [scale_rows, groups] chosen from the whole matrix before any rounding (then every zero is
        `fixed_zero`), or None where each group's scale follows its columns (`group_params`)."""
        return None

    # --- storage ----------------------------------------------------------------------------------------------
    def packed_columns(self, in_features: int) -> tuple[int, torch.dtype]:
        """(columns, dtype) of `weight_packed` for rows of `in_features` codes."""
        raise NotImplementedError

    def stored_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[list[int], torch.dtype]]:
        """The tensors a packed [out, in] matrix is stored as: {name: (shape, dtype)}."""
        columns, dtype = self.packed_columns(in_features)
        groups = self.groups(in_features)
        shapes = {
            "weight_packed": ([out_features, columns], dtype),
            "weight_scale": ([self.scale_rows(out_features), groups], SCALE_DTYPE),
        }
        if self.zero_bits:
            shapes["weight_zero_point"] = ([out_features, groups], torch.uint8)
        return shapes

    def nbytes(self, out_features: int, in_features: int) -> int:
        shapes = self.stored_shapes(out_features, in_features).values()
        return sum(torch.Size(shape).numel() * dtype.itemsize for shape, dtype in shapes)

    def pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unpack_codes(self, packed: torch.Tensor, in_features: int) -> torch.Tensor:
        raise NotImplementedError

    def pack(self, qt: QTensor) -> PackedTensor:
        tensors = {"weight_packed": self.pack_codes(qt.codes), "weight_scale": qt.scales.contiguous()}
        if self.zero_bits:
            tensors["weight_zero_point"] = qt.zeros.contiguous()
        return PackedTensor(tensors, qt.shape, self)

    def unpack(self, pt: PackedTensor) -> QTensor:
        codes = self.unpack_codes(pt.tensors["weight_packed"], pt.shape[1])
        return QTensor(codes, pt.tensors["weight_scale"], self.zero_points(pt.tensors), self)

    def zero_points(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 zero points [scale_rows, groups]: the stored ones, or `fixed_zero` where none are stored."""
        zeros = tensors.get("weight_zero_point")
        return (
            zeros if zeros is not None else torch.full_like(tensors["weight_scale"], self.fixed_zero, dtype=torch.uint8)
        )

    # --- kernels ----------------------------------------------------------------------------------------------
    def kernel_operand(self, tensors: dict[str, torch.Tensor], in_features: int) -> KernelOperand:
        """The stored tensors as the kernels read them (plain bit streams are read as they are)."""
        zero = tensors.get("weight_zero_point")
        return KernelOperand(
            tensors["weight_packed"].contiguous(),
            self.bits,
            tensors["weight_scale"].contiguous(),
            None if zero is None else zero.contiguous(),
            self.fixed_zero,
        )


def format_class(d: dict) -> type[QuantFormat]:
    """The family of a format dict: by its "format" name, else the legacy family whose keys it carries (the most
    specific match)."""
    if "format" in d:
        if d["format"] not in FORMATS:
            raise ValueError(f"unknown packed format '{d['format']}' (this moecompress knows {sorted(FORMATS)})")
        return FORMATS[d["format"]]
    legacy = [c for c in FORMATS.values() if c.legacy_keys is not None]
    matching = [c for c in legacy if all(d.get(k) == v for k, v in c.legacy_keys.items())]
    if not matching:
        raise ValueError(f"format {d} names no known packed format")
    return max(matching, key=lambda c: len(c.legacy_keys))


def pack(qt: QTensor) -> PackedTensor:
    return qt.fmt.pack(qt)


def unpack(pt: PackedTensor) -> QTensor:
    return pt.fmt.unpack(pt)
