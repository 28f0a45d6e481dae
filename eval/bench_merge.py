"""Expert merging and pruning (issue 5) on moe-tiny-text, and with --vl on moe-tiny-vl: 25% and 50% of the
routed experts removed by (a) frequency-weighted averaging, (b) Sub-MoE subspace merging at two ranks,
(c) NAEE pruning, (d) each followed by GPTQ w4; with --factored, (e) factored experts (`factor:`) at the same
expert bytes as (d), every expert kept. Merges are measured with both router updates (shrink: one
row per merged expert; keep: all E rows mapped to merged experts). Every model is saved, loaded back, then
evaluated.

    python eval/bench_merge.py --max-windows 40 --vl     # ~40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_foundation import DATA, REPO, SHARED, TEXT, VL, perplexities, print_table
from transformers import AutoTokenizer

import moecompress
from moecompress.models import load_model
from moecompress.recipe import Recipe

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")
W4 = 4 + 24 / 128  # stored bits per parameter of w4g128 asym
KMEANS = {"clustering": "kmeans"}
METHODS = {
    "average (no alignment)": {"method": "average", "align_neurons": False, **KMEANS},
    "average (aligned)": {"method": "average", **KMEANS},
    "subspace r=0.5 (aligned)": {"method": "subspace", "rank": 0.5, **KMEANS},
    "subspace r=0.25 (aligned)": {"method": "subspace", "rank": 0.25, **KMEANS},
    "prune": {"method": "prune"},
    "average (dominant centers)": {"method": "average", "clustering": "dominant"},
    "subspace r=0.5 (dominant centers)": {"method": "subspace", "rank": 0.5, "clustering": "dominant"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    parser.add_argument("--max-windows", type=int, help="evaluate the first N 512-token windows of each set")
    parser.add_argument("--no-w4", action="store_true", help="skip the merged + GPTQ w4 rows")
    parser.add_argument("--methods", nargs="+", help="substrings of the method names to run (default: all)")
    parser.add_argument("--factored", action="store_true", help="also factored experts at each ratio's w4 bytes")
    parser.add_argument("--vl", action="store_true", help="also moe-tiny-vl at 25% on shapes-vl QA")
    parser.add_argument("--vl-only", action="store_true", help="only the moe-tiny-vl rows")
    parser.add_argument("--json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(TEXT)

    def evaluate(model) -> dict:
        return perplexities(model, tokenizer, args.max_windows)

    base = {} if args.vl_only else evaluate(load_model(str(TEXT)).model)
    rows = [] if args.vl_only else [{"config": "bf16 (reference, 16 experts/layer)", **base}]
    if rows:
        print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in [] if args.vl_only else args.ratios:
            for name, merge in METHODS.items():
                if args.methods and not any(m in name for m in args.methods):
                    continue
                # keep-router checkpoints are not quantizable yet, and pruning has no router choice: the
                # router ablation (keep vs shrink) and the alignment ablation run at the first ratio only
                variants = [("shrink", False)]
                if name == "average (no alignment)" and ratio != args.ratios[0]:
                    continue
                if "no alignment" not in name:
                    variants += [] if args.no_w4 else [("shrink", True)]
                    if ratio == args.ratios[0] and name in ("average (aligned)", "subspace r=0.5 (aligned)"):
                        variants.append(("keep", False))
                for router, quantize in variants:
                    recipe = Recipe.from_dict(
                        {
                            "name": "merge",
                            "calibration": {"dataset": CALIB},
                            "merge": {**merge, "ratio": ratio, "router": router},
                            "quantization": {"method": "gptq", "bits": 4} if quantize else {"method": "none"},
                        }
                    )
                    label = (
                        f"-{ratio:.0%} {name}"
                        + (", router keep" if router == "keep" else "")
                        + (" + w4" if quantize else "")
                    )
                    out = Path(tmp) / "model"
                    start = time.perf_counter()
                    result = moecompress.compress(str(TEXT), recipe, output=out, progress=False)
                    row = {
                        "config": label,
                        "experts/layer": result.report.merge["experts_per_layer"][0],
                        "expert params M": result.report.expert_params / 1e6,
                        "expert MB": result.report.expert_bytes / 1e6,
                        "seconds": time.perf_counter() - start,
                    }
                    row.update(evaluate(moecompress.load(out, cache_dequantized=True)))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            if args.factored:  # the same expert bytes as this ratio's merged + GPTQ w4 rows, all experts kept
                recipe = Recipe.from_dict(
                    {
                        "name": "factored",
                        "calibration": {"dataset": CALIB},
                        "factor": {"enabled": True, "avg_bits": (1 - ratio) * W4},
                    }
                )
                out = Path(tmp) / "model"
                start = time.perf_counter()
                result = moecompress.compress(str(TEXT), recipe, output=out, overwrite=True, progress=False)
                row = {
                    "config": f"factored at the bytes of -{ratio:.0%} + w4",
                    "experts/layer": 16,
                    "expert MB": result.report.expert_bytes / 1e6,
                    "seconds": time.perf_counter() - start,
                }
                row.update(evaluate(moecompress.load(out, cache_dequantized=True)))
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.vl or args.vl_only:
            rows += bench_vl(Path(tmp))
    print_table(rows, ["config", "experts/layer", "expert params M", "expert MB", "seconds", *DATA, "qa"], base)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def bench_vl(tmp: Path) -> list[dict]:
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
    for name in ("prune-25", "submoe-25"):
        recipe = Recipe.from_yaml(REPO / "pipelines" / f"{name}.yaml")
        recipe.calibration.dataset = CALIB
        recipe.calibration.vl_dataset = str(SHARED / "data" / "shapes-vl" / "calib.jsonl")
        for quantize in (False, True):
            recipe.quantization.method = "gptq" if quantize else "none"
            out = tmp / "vl"
            result = moecompress.compress(str(VL), recipe, output=out, trust_remote_code=True, progress=False)
            model = moecompress.load(out, cache_dequantized=True, trust_remote_code=True)
            rows.append(
                {
                    "config": f"vl {name}" + (" + w4" if quantize else ""),
                    "experts/layer": result.report.merge["experts_per_layer"][0],
                    "qa": vl_qa_accuracy(model, processor, eval_set, progress=False).accuracy,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
