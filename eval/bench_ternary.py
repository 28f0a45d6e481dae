"""Ternary experts (issue 4) on moe-tiny-text, and with --vl on moe-tiny-vl: post-training ternarization,
then quantization-aware distillation recovery; compared with 2-bit GPTQ at (about) equal size.
Every model is saved, loaded back from disk, then evaluated.

    python eval/bench_ternary.py --steps 300            # ~25 min on 2 cores
    python eval/bench_ternary.py --steps 20 --max-windows 20   # quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_foundation import DATA, REPO, SHARED, TEXT, VL, folder_bytes, perplexities, print_table
from transformers import AutoTokenizer

import moecompress
from moecompress.models import load_model
from moecompress.recipe import Recipe

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")
TERNARY = {"method": "gptq", "ternary": True, "group_size": -1}


def configs(steps: int) -> dict[str, dict]:
    recovery = Recipe.from_yaml(REPO / "pipelines" / "ternary-experts.yaml").recovery
    recovery.steps = steps
    trained = {"enabled": True, **{k: v for k, v in vars(recovery).items() if k != "enabled"}}
    return {
        "gptq-w2-g128": {"quantization": {"method": "gptq", "bits": 2}},
        "ternary-row ptq": {"quantization": TERNARY},
        "ternary-g32 ptq (~w2 size)": {"quantization": {**TERNARY, "group_size": 32}},
        "lp {ternary,2,3,4} g128 @ w2 size": {
            "quantization": {**TERNARY, "ternary": False, "group_size": 128},
            "allocation": {"method": "lp", "avg_bits": 2.0, "scope": "global", "candidates": ["ternary", 2, 3, 4]},
        },
        f"ternary-row + recovery {steps} steps": {"quantization": TERNARY, "recovery": trained},
        f"gptq-w2-g128 + recovery {steps} steps": {"quantization": {"method": "gptq", "bits": 2}, "recovery": trained},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300, help="recovery training steps")
    parser.add_argument("--configs", nargs="+", help="substrings of the config names to run (default: all)")
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--vl", action="store_true", help="also moe-tiny-vl ternary (+ recovery) on shapes-vl QA")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(TEXT)

    def evaluate(model) -> dict:
        return perplexities(model, tokenizer, args.max_windows)

    base = evaluate(load_model(str(TEXT)).model)
    rows = [{"config": "bf16 (reference)", "bits/param": 16.0, "expert MB": expert_mb_bf16(), **base}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in configs(args.steps).items():
            if args.configs and not any(c in name for c in args.configs):
                continue
            recipe = Recipe.from_dict({"name": name.split()[0], **overrides, "calibration": {"dataset": CALIB}})
            out = Path(tmp) / name.replace(" ", "_").replace("/", "")
            start = time.perf_counter()
            result = moecompress.compress(str(TEXT), recipe, output=out, progress=False)
            seconds = time.perf_counter() - start
            row = {
                "config": name,
                "bits/param": result.report.bits_per_expert_param,
                "expert MB": result.report.expert_bytes / 1e6,
                "ckpt MB": folder_bytes(out) / 1e6,
                "compress s": seconds,
            }
            if result.report.recovery:
                row["train s"] = result.report.recovery["seconds"]
            row.update(evaluate(moecompress.load(out, cache_dequantized=True)))
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
        if args.vl:
            rows += bench_vl(Path(tmp), args.steps, args.configs)
    print_table(rows, ["config", "bits/param", "expert MB", "ckpt MB", "compress s", "train s", *DATA, "qa"], base)
    print_gap_closed(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def expert_mb_bf16() -> float:
    loaded = load_model(str(TEXT))
    return sum(p.numel() * 2 for v in loaded.adapter.moe_blocks(loaded.model) for p in v.experts.parameters()) / 1e6


def print_gap_closed(rows: list[dict]) -> None:
    """Share of the PTQ-to-bf16 perplexity gap that recovery training closed."""
    base = rows[0]
    for trained in (r for r in rows if "recovery" in r["config"] and "wiki" in r):
        ptq = next(
            (
                r
                for r in rows
                if r["config"] == trained["config"].split(" + ")[0] + " ptq"
                or r["config"] == trained["config"].split(" + ")[0]
            ),
            None,
        )
        if ptq is None:
            continue
        closed = {k: (ptq[k] - trained[k]) / (ptq[k] - base[k]) for k in DATA if k in trained}
        print(f"{trained['config']}: gap to bf16 closed " + ", ".join(f"{k} {v:.0%}" for k, v in closed.items()))


def bench_vl(tmp: Path, steps: int, configs: list[str] | None = None) -> list[dict]:
    from moecompress.evaluation.vlqa import vl_qa_accuracy
    from moecompress.pipeline import load_tokenizer_or_processor

    processor = load_tokenizer_or_processor(str(VL), True, trust_remote_code=True)
    eval_set = str(SHARED / "data" / "shapes-vl" / "eval.jsonl")
    rows = [
        {
            "config": "vl bf16 (reference)",
            "qa": vl_qa_accuracy(load_model(str(VL)).model, processor, eval_set, progress=False).accuracy,
        }
    ]
    recipe = Recipe.from_yaml(REPO / "pipelines" / "ternary-experts.yaml")
    recipe.calibration.vl_dataset = str(SHARED / "data" / "shapes-vl" / "calib.jsonl")
    recipe.recovery.steps = steps
    variants = {  # name: (recovery enabled, text windows, image items)
        "vl ternary-row ptq": (False, 0, 0),
        f"vl ternary-row + recovery {steps} steps": (True, recipe.recovery.num_samples, recipe.recovery.vl_num_samples),
        f"vl ternary-row + recovery {steps} steps, image-heavy data (200 text windows + 200 image items)": (
            True,
            200,
            200,
        ),
    }
    for name, (enabled, text_windows, image_items) in variants.items():
        if configs and not any(c in name for c in configs):
            continue
        recipe.recovery.enabled = enabled
        recipe.recovery.num_samples, recipe.recovery.vl_num_samples = max(text_windows, 1), image_items
        out = tmp / name.replace(" ", "_")
        start = time.perf_counter()
        result = moecompress.compress(str(VL), recipe, output=out, trust_remote_code=True, progress=False)
        model = moecompress.load(out, cache_dequantized=True, trust_remote_code=True)
        rows.append(
            {
                "config": name,
                "bits/param": result.report.bits_per_expert_param,
                "expert MB": result.report.expert_bytes / 1e6,
                "compress s": time.perf_counter() - start,
                "qa": vl_qa_accuracy(model, processor, eval_set, progress=False).accuracy,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
