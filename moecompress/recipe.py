"""Recipes: typed dataclasses read from YAML, with unknown keys rejected by name; one section per registered stage."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Union

import yaml

from .calibration.budget import budget_problem
from .calibration.config import CalibrationConfig
from .calibration.data import window_counts_problem
from .errors import RecipeError
from .stages import STAGES


class RecipeBase:
    """The methods of `Recipe`, whose fields are assembled from the registered stages (`Recipe` below)."""

    def fail(self, message: str) -> None:
        raise RecipeError(f"recipe '{self.name}': {message}")

    def validate(self) -> Recipe:
        calibration_problem = window_counts_problem(self.calibration, "calibration")
        memory_problem = budget_problem(self.calibration)
        checks = [
            (not calibration_problem, calibration_problem),
            (not memory_problem, memory_problem),
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
                self.fail(message)
        check_device(self.device)
        for stage in sorted(STAGES, key=lambda s: not s.validated_first):
            stage.validate(self)
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
        keys = [("calibration", "dataset"), ("calibration", "vl_dataset")]
        keys += [(stage.section, key) for stage in STAGES for key in stage.path_keys]
        for section, key in keys:
            owner = getattr(self, section)
            value = getattr(owner, key)
            if value and not Path(value).expanduser().is_absolute():
                candidate = folder / value
                if candidate.exists() or value.startswith(".") or Path(value).suffix in (".jsonl", ".txt", ".json"):
                    setattr(owner, key, str(candidate.resolve()))
        return self


def _recipe_fields() -> list[tuple]:
    """name, description, calibration, each registered stage's section (in pipeline order), device, save_dtype."""
    fields = [("name", str, field(default="gptq-w4g128")), ("description", str, field(default=""))]
    fields.append(("calibration", CalibrationConfig, field(default_factory=CalibrationConfig)))
    fields += [(s.section, s.config, field(default_factory=s.config)) for s in STAGES if s.section]
    return [*fields, ("device", str, field(default="cpu")), ("save_dtype", str, field(default="bfloat16"))]


Recipe = dataclasses.make_dataclass("Recipe", _recipe_fields(), bases=(RecipeBase,))
Recipe.__module__ = __name__
Recipe.__doc__ = """A compression recipe: the calibration data, each stage's section, the device and the dtype of the
unquantized tensors. Read from YAML (`from_yaml`), every key checked against its section's dataclass."""


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
