"""Recipes: typed dataclasses read from YAML, with unknown keys rejected by name."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .allocation.allocate import AllocationConfig
from .dynamic.skip import SkipConfig
from .errors import RecipeError
from .merge.apply import MergeConfig
from .quant.experts import RARE_POLICIES
from .quant.qtensor import PACKINGS, SUPPORTED_BITS, TERNARY, QuantFormat
from .quant.ternary import TERNARY_SCALE_METHODS
from .slim.staged import SlimConfig
from .training.qat import QAT_INITS, RecoveryConfig


@dataclass
class CalibrationConfig:
    dataset: str = "../shared/data/calib/calib_mix.jsonl"
    num_samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    vl_dataset: str | None = None
    vl_num_samples: int = 128
    seed: int = 0


@dataclass
class RareExpertConfig:
    policy: str = "pool"
    min_tokens: int = 256


@dataclass
class QuantizationConfig:
    """Routed-expert quantization. `ternary: true` quantizes every expert to {-1, 0, 1} x scale instead of
    `bits` (group_size 0 = one scale per tensor, -1 = per output channel); ternary is also an allocation
    candidate, with the same ternary_* settings."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False
    ternary: bool = False
    ternary_packing: str = "base3"
    ternary_scale: str = "lsq"
    rare_experts: RareExpertConfig = field(default_factory=RareExpertConfig)

    @property
    def format(self) -> QuantFormat:
        return self.format_for(TERNARY if self.ternary else self.bits)

    def format_for(self, key: int | str) -> QuantFormat:
        """The format an allocation candidate key (a bit width or "ternary") stands for."""
        if key == TERNARY:
            return QuantFormat.make_ternary(self.group_size, self.ternary_packing)
        return QuantFormat(int(key), self.group_size, self.sym)


@dataclass
class Recipe:
    name: str = "gptq-w4g128"
    description: str = ""
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)
    device: str = "cpu"
    save_dtype: str = "bfloat16"

    def validate(self) -> Recipe:
        q = self.quantization
        checks = [
            (q.method in ("gptq", "rtn", "none"), f"quantization.method '{q.method}': use gptq, rtn or none"),
            (q.bits in SUPPORTED_BITS, f"quantization.bits {q.bits}: use one of {list(SUPPORTED_BITS)}"),
            (q.group_size >= -1 and (q.group_size != 0 or q.ternary),
             f"quantization.group_size {q.group_size}: use a positive size or -1 (0, per tensor, only with ternary)"),
            (q.ternary_packing in PACKINGS, f"quantization.ternary_packing '{q.ternary_packing}': use one of {list(PACKINGS)}"),
            (q.ternary_scale in TERNARY_SCALE_METHODS, f"quantization.ternary_scale '{q.ternary_scale}': use one of {list(TERNARY_SCALE_METHODS)}"),
            (0 < q.damp < 1, f"quantization.damp {q.damp}: use a fraction of the mean Hessian diagonal in (0, 1), e.g. 0.01"),
            (q.rare_experts.policy in RARE_POLICIES, f"quantization.rare_experts.policy '{q.rare_experts.policy}': use one of {list(RARE_POLICIES)}"),
            (self.calibration.num_samples > 0 and self.calibration.seq_len > 1, "calibration.num_samples and seq_len must be positive"),
            (self.recovery.init in QAT_INITS, f"recovery.init '{self.recovery.init}': use one of {list(QAT_INITS)}"),
            (self.save_dtype in ("bfloat16", "float16", "float32"), f"save_dtype '{self.save_dtype}': use bfloat16, float16 or float32"),
        ]
        for ok, message in checks:
            if not ok:
                raise RecipeError(f"recipe '{self.name}': {message}")
        self.allocation.validate()
        self.merge.validate()
        if self.merge.method != "none" and self.merge.router == "keep" and q.method != "none":
            raise RecipeError(f"recipe '{self.name}': merge.router keep cannot be quantized yet; use merge.router: shrink.")
        if self.recovery.enabled and q.method == "none":
            raise RecipeError(f"recipe '{self.name}': recovery trains quantized experts; set a quantization.method.")
        if self.recovery.enabled:
            self.recovery.distill_config()
        self.skip.validate()
        if self.slim.enabled:
            self.slim.validate()
            if self.merge.method != "none" and self.merge.router == "keep":
                raise RecipeError(f"recipe '{self.name}': slimming needs merge.router shrink (keep-router experts are mapped).")
        if (self.slim.enabled or self.merge.method != "none") and self.recovery.enabled and self.recovery.init == "original":
            raise RecipeError(f"recipe '{self.name}': recovery.init original starts from the source experts, which "
                              "merging/slimming changed; set recovery.init: quantized.")
        return self

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
            hint = f" Shipped recipes: {', '.join(sorted(p.name for p in shipped.glob('*.yaml')))}." if shipped.is_dir() else ""
            raise RecipeError(f"recipe file '{path}' does not exist.{hint}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RecipeError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of keys to values, got {type(data).__name__}.")
        return cls.from_dict(data, where=str(path))


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{where}: unknown key '{key}'.{hint} Valid keys here: {', '.join(fields)}.")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, default, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value, default, where: str):
    if default is None or value is None or isinstance(value, type(default)):
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise RecipeError(f"{where}: expected {type(default).__name__}, got {value!r}.")
