"""Expert slimming (issue 6) on moe-tiny-text: every routed expert cut to half its intermediate width
(50 % of the expert parameters), one-shot (no training) vs one-shot + distillation vs staged slimming with
distillation after each stage, at the same total number of training steps. Models are saved, loaded back
and evaluated.

    python eval/bench_slim.py --steps 300 --max-windows 100     # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench_foundation import DATA, SHARED, TEXT, perplexities, print_table
from transformers import AutoTokenizer

import moecompress
from moecompress.models import load_model
from moecompress.recipe import Recipe

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=300, help="total distillation steps of the trained configurations")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(TEXT)

    def evaluate(model) -> dict:
        return perplexities(model, tokenizer, args.max_windows)

    base = evaluate(load_model(str(TEXT)).model)
    rows = [{"config": "bf16 (reference)", "expert width": 256, **base}]
    print(json.dumps(rows[-1]), flush=True)
    configs = {
        "one-shot Taylor, no training": {"stages": 1, "steps_per_stage": 0},
        f"one-shot + {args.steps} distill steps": {"stages": 1, "steps_per_stage": args.steps},
        f"{args.stages} stages x {args.steps // args.stages} distill steps": {
            "stages": args.stages,
            "steps_per_stage": args.steps // args.stages,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, slim in configs.items():
            recipe = Recipe.from_dict(
                {
                    "name": "slim",
                    "calibration": {"dataset": CALIB, "num_samples": 32, "seq_len": 512},
                    "quantization": {"method": "none"},
                    "slim": {"enabled": True, "target": args.target, "num_samples": 1200, **slim},
                }
            )
            result = moecompress.compress(str(TEXT), recipe, output=Path(tmp) / "model", progress=False)
            stages = result.report.slim["stages"]
            row = {
                "config": label,
                "expert width": result.report.slim["final_width"],
                "expert params M": result.report.expert_params / 1e6,
                "train s": sum(s["distill"]["seconds"] for s in stages if s["distill"]),
                "steps": sum(s["distill"]["steps"] for s in stages if s["distill"]),
                **evaluate(moecompress.load(Path(tmp) / "model")),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, ["config", "expert width", "expert params M", "steps", "train s", *DATA], base)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
