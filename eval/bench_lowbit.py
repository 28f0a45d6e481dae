"""Below 3 bits on moe-tiny-text (issue 39): each GPTQ option on its own and combined, at 2 and 3 bits, with bits per
expert weight (every scale and zero point counted), perplexity ratios to bf16 on WikiText-2, python and kernel
held-out text, compress seconds and the process's peak RSS. GPTQModel 7.7's rows (issue 39's table: the same 128
calibration windows, routed experts only, the same evaluator) are quoted for reference. Every checkpoint is saved,
loaded back, then evaluated with float32 activations.

    python eval/bench_lowbit.py                      # first 32 windows of each set, as issue 39's table (~8 min)
    python eval/bench_lowbit.py --full --settings w2  # whole sets, the 2-bit rows
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from bench_foundation import SHARED, TEXT, perplexities, print_table
from transformers import AutoTokenizer

import moecompress
from moecompress.models import load_model
from moecompress.recipe import Recipe
from moecompress.runtime import native

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")
W2 = {"method": "gptq", "bits": 2, "group_size": 64}
W3 = {"method": "gptq", "bits": 3, "group_size": 128}
BEST = {"damp": 0.05, "act_order": True, "clip_search": True}
SETTINGS = {
    "w2 g64": W2,
    "w2 g64 damp 0.05": {**W2, "damp": 0.05},
    "w2 g64 damp 0.1": {**W2, "damp": 0.1},
    "w2 g64 act_order": {**W2, "act_order": True},
    "w2 g64 clip_search": {**W2, "clip_search": True},
    "w2 g64 rare rtn": {**W2, "rare_experts": {"policy": "rtn", "min_tokens": 256}},
    "w2 g64 rare own": {**W2, "rare_experts": {"policy": "own", "min_tokens": 256}},
    "w2 g64 damp 0.05 + act_order + clip_search": {**W2, **BEST},
    "w2 g64 act_order + clip_search": {**W2, **BEST, "damp": 0.01},
    "w2 g64 damp 0.1 + act_order + clip_search": {**W2, **BEST, "damp": 0.1},
    "w3 g128": W3,
    "w3 g128 damp 0.05 + act_order + clip_search": {**W3, **BEST},
}
# issue 39's table: GPTQModel 7.7, ppl ratio to bf16 on the first 32 windows (wiki / python / kernel)
PEERS = [
    {"config": "GPTQModel w2 g64 (quoted)", "bits/param": 2.41, "wiki": 1.0538, "python": 1.0453, "kernel": 1.0476},
    {"config": "GPTQModel w3 g128 (quoted)", "bits/param": 3.27, "wiki": 1.0130, "python": 1.0087, "kernel": 1.0048},
]


def run(name: str, quantization: dict, tmp: Path, evaluate) -> dict:
    recipe = Recipe.from_dict({"name": "lowbit", "quantization": quantization, "calibration": {"dataset": CALIB}})
    out = tmp / name.replace(" ", "_").replace("+", "")
    start = time.perf_counter()
    result = moecompress.compress(str(TEXT), recipe, output=out, progress=False)
    seconds = time.perf_counter() - start
    row = {"config": name, "bits/param": result.report.bits_per_expert_param, "compress s": seconds}
    row.update(evaluate(moecompress.load(out, cache_dequantized=True)))
    row["peak RSS MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", help="substrings of the setting names to run (default: all)")
    parser.add_argument("--full", action="store_true", help="whole evaluation sets (default: first 32 windows)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(TEXT)
    windows = None if args.full else 32

    def evaluate(model) -> dict:
        with native.float32_activations():
            return perplexities(model, tokenizer, windows)

    base = evaluate(load_model(str(TEXT)).model)
    rows = [{"config": "bf16 (reference)", "bits/param": 16.0, **base}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, quantization in SETTINGS.items():
            if args.settings and not any(s in name for s in args.settings):
                continue
            rows.append(run(name, quantization, Path(tmp), evaluate))
            print(json.dumps(rows[-1]), flush=True)
    if not args.full:  # the quoted ratios, as perplexities on this run's reference
        rows += [{**p, **{k: p[k] * base[k] for k in base}} for p in PEERS]
    print_table(rows, ["config", "bits/param", "wiki", "python", "kernel", "compress s", "peak RSS MB"], base)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
