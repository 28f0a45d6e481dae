"""One family of the architecture sweep (eval/check_architectures.py, tests/models/test_any_moe.py): a tiny random
model of the family through the layer-wise engine, the streamed pipeline and both loaders (see that script)."""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

import moecompress
from moecompress.calibration.data import CalibrationBatch
from moecompress.errors import MoECompressError
from moecompress.io.interop import export_interop
from moecompress.models import get_adapter, supported_model_types
from moecompress.models.base import PROJECTIONS
from moecompress.models.generic import GenericAdapter, text_model_type
from moecompress.quant.rtn import quantize_rtn
from moecompress.recipe import Recipe
from moecompress.runtime import native

from .tiny_models import tiny_model, walked_states

FAST = {"rtn w4": {"quantization": {"method": "rtn", "bits": 4, "group_size": 16}}}
FULL = {
    "gptq w4": {"quantization": {"method": "gptq", "bits": 4, "group_size": 16, "sym": True}},
    "mc 2.5": {
        "quantization": {"method": "gptq", "group_size": 16},
        "allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4]},
    },
    "ternary": {
        "quantization": {"method": "gptq", "ternary": True, "group_size": -1, "ternary_packing": "base3"},
        "recovery": {"enabled": False},
    },
}


def moe_model_types() -> list[str]:
    """Each model type whose modeling file uses `use_experts_implementation` (a family's sub-configs left out), each
    multimodal type whose default text decoder is one of those (Kimi-K2.5 on DeepSeek-V3), and each type a family
    file claims."""
    root = Path(transformers.__file__).parent / "models"
    folders = {p.parent.name for p in root.glob("*/modeling_*.py") if "@use_experts_implementation" in p.read_text()}
    nested = {getattr(sub, "model_type", None) for t in CONFIG_MAPPING_NAMES for sub in sub_configs(CONFIG_MAPPING[t])}
    tops = [t for t in CONFIG_MAPPING_NAMES if t not in nested]
    found = {t for t in tops if model_type_to_module_name(t) in folders}
    on_moe = {t for t in tops if "text_config" in (CONFIG_MAPPING[t].sub_configs or {}) and text_model_type(t) in found}
    return sorted(found | on_moe | set(supported_model_types()))


def sub_configs(config_class) -> list[type]:
    """A config class's sub-config classes, nested ones included."""
    found, todo = [], list((getattr(config_class, "sub_configs", None) or {}).values())
    while todo:
        sub = todo.pop()
        if isinstance(sub, type) and sub not in found:
            found.append(sub)
            todo.extend((getattr(sub, "sub_configs", None) or {}).values())
    return found


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def routing(adapter) -> str:
    """How the adapter recomputes routing (drop-loss, merging, pruning): its family file's rule, the generic rule the
    calibration walk recognized, or none (quantization methods only: they read the observed routing)."""
    if not isinstance(adapter, GenericAdapter):
        return "family file"
    rule = adapter.rule
    return "observed only" if rule is None else f"{rule[0]}{', top-k renormalised' if rule[1] else ''}"


def walk_error(model, adapter) -> float:
    """Largest relative error of the layer-wise engine's hidden states against the model's own forward."""
    ids = torch.randint(3, 110, (2, 40), generator=torch.Generator().manual_seed(1))
    batch = CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids).bool())
    walked = walked_states(model, adapter, [batch])
    with torch.no_grad():
        real = model(**batch.inputs, output_hidden_states=True).hidden_states
    return max(rel(walked[i][0], real[i + 1]) for i in range(len(walked) - 1))


def interop(adapter, w4: Path, work: Path, test: torch.Tensor, ours: torch.Tensor) -> str:
    try:
        folder = export_interop(w4, work / "ct", "compressed-tensors", overwrite=True)
    except MoECompressError as exc:
        return f"refused: {str(exc).split(',')[0]}"
    try:
        model = adapter.auto_model_class().from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            return f"loads, {rel(model(input_ids=test).logits, ours):.1e}"
    except Exception as exc:  # whatever transformers or compressed-tensors raise is the finding
        return f"fails: {type(exc).__name__}"


def expert_weights(model, adapter) -> list[torch.Tensor]:
    """Every routed expert's projections as float matrices, block by block."""
    return [
        view.expert_weights(e)[p].detach().float().clone()
        for view in adapter.moe_blocks(model)
        for e in range(view.num_experts)
        for p in PROJECTIONS
    ]


def rtn_round_trip(original: list[torch.Tensor], loaded: list[torch.Tensor], recipe: dict) -> float:
    """Largest relative difference between the loaded checkpoint's experts and the same RTN applied in memory."""
    fmt = Recipe.from_dict(recipe).quantization.format
    return max(rel(b, quantize_rtn(a, fmt).dequantize()) for a, b in zip(original, loaded, strict=True))


def check(model_type: str, work: Path, recipes: dict) -> dict:
    model, adapter = tiny_model(model_type), get_adapter(model_type)
    row = {"adapter": "generic" if isinstance(adapter, GenericAdapter) else "file"}
    row["walk"] = walk_error(model, adapter)
    row["routing"] = routing(adapter)
    model.save_pretrained(work / "src")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 110, (4, 48), generator=gen) for _ in range(2)]
    batches = [
        CalibrationBatch({"input_ids": i, "attention_mask": torch.ones_like(i)}, torch.zeros_like(i).bool())
        for i in ids
    ]
    test = torch.randint(3, 110, (2, 40), generator=gen)
    with torch.no_grad():
        reference = model(input_ids=test).logits
        original = expert_weights(model, adapter)
        for view in adapter.moe_blocks(model):
            adapter.down_projections(view.experts)[0].zero_()
        row["scale"] = rel(model(input_ids=test).logits, reference)
    identical = True
    for name, recipe in recipes.items():
        out = work / name.replace(" ", "-")
        with mock.patch("moecompress.pipeline.calibration_batches", lambda *a, **k: batches):
            moecompress.compress(str(work / "src"), Recipe.from_dict(recipe), out, progress=False, overwrite=True)
        with torch.no_grad():
            loaded = moecompress.load(out)
            ours = loaded(input_ids=test).logits
            theirs = adapter.auto_model_class().from_pretrained(out, dtype=torch.float32)(input_ids=test).logits
        identical &= torch.equal(ours, theirs)
        row[name] = rel(ours, reference)
        if name == "rtn w4":
            row["round trip"] = rtn_round_trip(original, expert_weights(loaded, get_adapter(model_type)), recipe)
        if name == "gptq w4":
            row["compressed-tensors"] = interop(adapter, out, work, test, ours)
    row["identical"] = identical
    return row


def passes(row: dict) -> bool:
    """Engine vs forward <= 1e-5, the streamed RTN w4 checkpoint's experts those of RTN in memory (<= 1e-6), its
    logits' error inside the experts-zeroed scale, and from_pretrained == load."""
    round_trip = row["round trip"] <= 1e-6 and row["rtn w4"] < row["scale"]
    return "refused" not in row and row["walk"] <= 1e-5 and round_trip and row["identical"]


def one_line(exc: Exception) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip()
    return f"{'' if isinstance(exc, MoECompressError) else type(exc).__name__ + ': '}{text[:160]}"


def run(model_type: str, work: Path, recipes: dict) -> dict:
    """The row of one family, or {'refused': reason} (our refusal, or what failed, in one line)."""
    try:
        with native.float32_activations():  # logits as the evaluations compute them (int8 would add its rounding)
            return check(model_type, work, recipes)
    except Exception as exc:  # noqa: BLE001 - a family that fails is a row of the table, not the end of the sweep
        return {"refused": one_line(exc), "ours": isinstance(exc, MoECompressError)}
