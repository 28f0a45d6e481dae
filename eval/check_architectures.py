"""Every architecture of the tiny-model matrix (tests/models/tiny_models.py: random weights of std 0.2, vision towers
of one block) through the streamed pipeline on random calibration tokens, with three recipes: GPTQ w4 g16
(symmetric, so that compressed-tensors can take it), LP mixed precision at 2.5 bits (2/3/4) and ternary PTQ (per
output channel, base-3). Prints per architecture:
- the relative L2 error of the logits against the float32 original for each recipe, next to the error with every
  routed expert zeroed (the scale: random models are chaotic, only the ratio to it means something);
- whether transformers' `from_pretrained` gives `moecompress.load`'s logits bit for bit (all three checkpoints);
- whether the compressed-tensors export of the w4 checkpoint loads in transformers, and its logits' relative
  difference from `moecompress.load`'s (or the export's own refusal);
- the layer-wise engine's largest relative error against the model's own forward over all decoder layers.

    python eval/check_architectures.py [--types qwen3_moe glm4v_moe ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

import moecompress
from moecompress.calibration.data import CalibrationBatch
from moecompress.errors import MoECompressError
from moecompress.io.interop import export_interop
from moecompress.models import get_adapter
from moecompress.recipe import Recipe
from moecompress.runtime import native

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tiny models of the test suite
from tests.models.tiny_models import CONFIGS, tiny_model, walked_states  # noqa: E402

RECIPES = {
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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def walk_error(model_type: str) -> float:
    """Largest relative error of the layer-wise engine's hidden states against the model's own forward."""
    model, adapter = tiny_model(model_type), get_adapter(model_type)
    ids = torch.randint(3, 110, (2, 40), generator=torch.Generator().manual_seed(1))
    batch = CalibrationBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.zeros_like(ids).bool())
    walked = walked_states(model, adapter, [batch])
    with torch.no_grad():
        real = model(**batch.inputs, output_hidden_states=True).hidden_states
    return max(rel(walked[i][0], real[i + 1]) for i in range(len(walked) - 1))


def interop(model_type: str, w4: Path, work: Path, test: torch.Tensor, ours: torch.Tensor) -> str:
    try:
        folder = export_interop(w4, work / "ct", "compressed-tensors", overwrite=True)
    except MoECompressError as exc:
        return f"refused: {str(exc).split(',')[0]}"
    try:
        model = get_adapter(model_type).auto_model_class().from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            return f"loads, {rel(model(input_ids=test).logits, ours):.1e}"
    except Exception as exc:  # whatever transformers or compressed-tensors raise is the finding
        return f"fails: {type(exc).__name__}"


def check(model_type: str, work: Path) -> dict:
    model, adapter = tiny_model(model_type), get_adapter(model_type)
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
        for view in adapter.moe_blocks(model):
            view.experts.down_proj.zero_()
        row = {
            "type": model_type,
            "multimodal": adapter.is_multimodal,
            "scale": rel(model(input_ids=test).logits, reference),
        }
    identical = True
    for name, recipe in RECIPES.items():
        out = work / name.replace(" ", "-")
        with mock.patch("moecompress.pipeline.calibration_batches", lambda *a, **k: batches):
            moecompress.compress(str(work / "src"), Recipe.from_dict(recipe), out, progress=False, overwrite=True)
        with torch.no_grad():
            ours = moecompress.load(out)(input_ids=test).logits
            theirs = adapter.auto_model_class().from_pretrained(out, dtype=torch.float32)(input_ids=test).logits
        identical &= torch.equal(ours, theirs)
        row[name] = rel(ours, reference)
        if name == "gptq w4":
            row["compressed-tensors"] = interop(model_type, out, work, test, ours)
    row["identical"], row["walk"] = identical, walk_error(model_type)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=sorted(CONFIGS))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    print(
        "| architecture | multimodal | gptq w4 | mc 2.5 | ternary | experts zeroed | from_pretrained == load | "
        "compressed-tensors (w4) | engine vs forward |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.types:
            work = (args.work or Path(tmp)) / model_type
            with native.float32_activations():  # logits as the evaluations compute them (int8 would add its rounding)
                r = check(model_type, work)
            print(
                f"| {model_type} | {'yes' if r['multimodal'] else ''} | {r['gptq w4']:.3f} | {r['mc 2.5']:.3f} | "
                f"{r['ternary']:.3f} | {r['scale']:.3f} | {'yes' if r['identical'] else 'NO'} | "
                f"{r['compressed-tensors']} | {r['walk']:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
