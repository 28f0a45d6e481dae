"""Recipes: typed dataclasses read from YAML, with unknown keys rejected by name."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .allocation.allocate import AllocationConfig
from .calibration.config import CalibrationConfig
from .calibration.data import window_counts_problem
from .dynamic.skip import SkipConfig
from .errors import RecipeError
from .formats import (
    FORMATS,
    SUPPORTED_BITS,
    TERNARY_SCALE_METHODS,
    ternary_packings,
)
from .merge.apply import MergeConfig
from .merge.factor_layer import FactorConfig
from .quant.config import RARE_POLICIES, QuantizationConfig
from .quant.methods import QUANTIZERS
from .slim.staged import SlimConfig
from .training.qat import QAT_INITS, RecoveryConfig


@dataclass
class Recipe:
    name: str = "gptq-w4g128"
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    factor: FactorConfig = field(default_factory=FactorConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)
    device: str = "cpu"
    save_dtype: str = "bfloat16"

    def validate(self) -> Recipe:
        q = self.quantization
        calibration_problem = window_counts_problem(self.calibration, "calibration")
        checks = [
            (
                q.method in (*QUANTIZERS, "none"),
                f"quantization.method '{q.method}': use one of {[*QUANTIZERS, 'none']}",
            ),
            (q.bits in SUPPORTED_BITS, f"quantization.bits {q.bits}: use one of {list(SUPPORTED_BITS)}"),
            (
                q.group_size >= -1 and (q.group_size != 0 or q.ternary),
                f"quantization.group_size {q.group_size}: use a positive size or -1 (0, per tensor, only with ternary)",
            ),
            (
                q.ternary_packing in ternary_packings(),
                f"quantization.ternary_packing '{q.ternary_packing}': use one of {ternary_packings()}",
            ),
            (
                q.packed_format in FORMATS and FORMATS[q.packed_format].key_name is None,
                f"quantization.packed_format '{q.packed_format}': use one of "
                f"{[n for n, c in FORMATS.items() if not c.key_name]}",
            ),
            (
                q.ternary_scale in TERNARY_SCALE_METHODS,
                f"quantization.ternary_scale '{q.ternary_scale}': use one of {list(TERNARY_SCALE_METHODS)}",
            ),
            (
                0 < q.damp < 1,
                f"quantization.damp {q.damp}: use a fraction of the mean Hessian diagonal in (0, 1), e.g. 0.01",
            ),
            (
                q.rare_experts.policy in RARE_POLICIES,
                f"quantization.rare_experts.policy '{q.rare_experts.policy}': use one of {list(RARE_POLICIES)}",
            ),
            (
                q.rare_experts.min_tokens >= 0,
                f"quantization.rare_experts.min_tokens {q.rare_experts.min_tokens}: use 0 or more",
            ),
            (not calibration_problem, calibration_problem),
            (self.recovery.init in QAT_INITS, f"recovery.init '{self.recovery.init}': use one of {list(QAT_INITS)}"),
            (
                self.save_dtype in ("bfloat16", "float16", "float32"),
                f"save_dtype '{self.save_dtype}': use bfloat16, float16 or float32",
            ),
            (
                self.calibration.activation_dtype in ("float32", "bfloat16"),
                f"calibration.activation_dtype '{self.calibration.activation_dtype}': use float32 or bfloat16",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"recipe '{self.name}': {message}")
        try:
            integer_format = q.format_for(q.bits)
        except ValueError as exc:
            raise RecipeError(f"recipe '{self.name}': quantization.packed_format '{q.packed_format}': {exc}") from exc
        check_device(self.device)
        self.allocation.validate()
        self.allocation.check_budget([q.format_for(k) for k in self.allocation.candidates], integer_format)
        self.merge.validate()
        if self.merge.method != "none" and self.merge.router == "keep" and q.method != "none":
            raise RecipeError(
                f"recipe '{self.name}': merge.router keep cannot be quantized yet; use merge.router: shrink."
            )
        if self.factor.enabled:
            self._check_factor()
        if self.recovery.enabled and q.method == "none":
            raise RecipeError(f"recipe '{self.name}': recovery trains quantized experts; set a quantization.method.")
        if self.recovery.enabled:
            self.recovery.distill_config()
        self.skip.validate()
        if self.slim.enabled:
            self.slim.validate()
            if self.merge.method != "none" and self.merge.router == "keep":
                raise RecipeError(
                    f"recipe '{self.name}': slimming needs merge.router shrink (keep-router experts are mapped)."
                )
        if (
            (self.slim.enabled or self.merge.method != "none")
            and self.recovery.enabled
            and self.recovery.init == "original"
        ):
            raise RecipeError(
                f"recipe '{self.name}': recovery.init original starts from the source experts, which "
                "merging/slimming changed; set recovery.init: quantized."
            )
        return self

    def _check_factor(self) -> None:
        self.factor.validate()
        clashes = [
            (
                self.quantization.method == "none",
                "quantization.method none (the factors are quantized: use gptq or rtn)",
            ),
            (
                self.allocation.method != "uniform",
                f"allocation.method {self.allocation.method} (factor allocates ranks and bits itself)",
            ),
            (self.quantization.ternary, "quantization.ternary (factors take integer widths)"),
            (self.recovery.enabled, "recovery (it trains per-expert packed weights, not factors)"),
        ]
        for clash, what in clashes:
            if clash:
                raise RecipeError(f"recipe '{self.name}': factor cannot be combined with {what}; remove one of them.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        return _build(cls, data, where).validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path).expanduser()
        if not path.is_file():
            shipped = Path(__file__).resolve().parent.parent / "pipelines"
            hint = (
                f" Shipped recipes: {', '.join(sorted(p.name for p in shipped.glob('*.yaml')))}."
                if shipped.is_dir()
                else ""
            )
            raise RecipeError(f"recipe file '{path}' does not exist.{hint}")
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}.")
        return cls.from_dict(data, where=str(path)).resolve_paths(path.resolve().parent)

    def resolve_paths(self, folder: Path) -> Recipe:
        """Relative data and teacher paths of a recipe file are relative to the file's folder (hub ids stay)."""
        for section, key in _PATH_KEYS:
            owner = getattr(self, section)
            value = getattr(owner, key)
            if value and not Path(value).expanduser().is_absolute():
                candidate = folder / value
                if candidate.exists() or value.startswith(".") or Path(value).suffix in (".jsonl", ".txt", ".json"):
                    setattr(owner, key, str(candidate.resolve()))
        return self


_PATH_KEYS = (
    ("calibration", "dataset"),
    ("calibration", "vl_dataset"),
    ("recovery", "dataset"),
    ("recovery", "teacher"),
    ("slim", "dataset"),
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def check_device(device: str) -> str:
    """`cpu`, `cuda` or `cuda:N` that this machine has."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RecipeError(f"device '{device}' is not a device name; use cpu, cuda or cuda:N.") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise RecipeError(f"device '{device}': moecompress runs on cpu or cuda; use one of those.")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(
            f"device '{device}': this machine has no CUDA device (or torch is a CPU build); use --device cpu."
        )
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise RecipeError(f"device '{device}': only {torch.cuda.device_count()} CUDA devices are visible.")
    return device


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{where}: unknown key '{key}'.{hint} Valid keys here: {', '.join(fields)}.")
        default = (
            fields[key].default_factory()
            if fields[key].default_factory is not dataclasses.MISSING
            else fields[key].default
        )
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value, hint, where: str):
    """`value` checked against the field's type hint (int, float, str, bool, None, unions, list[X], dict[K, V]);
    ints become floats where a float is expected; a bool is never a number."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except RecipeError:
                continue
    elif origin is list and isinstance(value, list):
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict and isinstance(value, dict):
        return {_coerce(k, args[0], f"{where} key"): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif hint is type(None) and value is None:
        return None
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise RecipeError(f"{where}: expected a finite number, got {value!r}.")
        return float(value)
    elif hint in (int, str, bool) and type(value) is hint:
        return value
    elif hint is Any:
        return value
    expected = str(hint).replace("typing.", "") if origin else getattr(hint, "__name__", str(hint))
    raise RecipeError(f"{where}: expected {expected}, got {value!r}.")
