"""Perplexity of compressed moe-tiny-text checkpoints through each CPU path for packed experts: the torch
reference (dequantize + matmul), the native kernels with float32 activations
(`MOECOMPRESS_CPU_ACTIVATIONS=fp32`), and the native kernels with int8 activations (the default on CPUs with
AVX-512 VNNI). Prints each path's perplexity on WikiText-2 and its relative change against the torch path
(target: within 1e-3).

    python eval/check_native_ppl.py [--max-windows 40] [--configs rtn-w4 gptq-w4 ...]

Every checkpoint is compressed by the CLI, saved, and loaded back with `moecompress.load`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from bench_foundation import DATA, SHARED, TEXT, compress_cli
from transformers import AutoTokenizer

import moecompress
from moecompress.evaluation.perplexity import perplexity
from moecompress.recipe import Recipe
from moecompress.runtime import native
from moecompress.runtime.packed_experts import set_dequant_cache

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")
CONFIGS = {
    "rtn-w8": {"quantization": dict(method="rtn", bits=8)},
    "rtn-w4": {"quantization": dict(method="rtn", bits=4)},
    "gptq-w4": {"quantization": dict(method="gptq", bits=4)},
    "gptq-w4-sym": {"quantization": dict(method="gptq", bits=4, sym=True)},
    "gptq-w3": {"quantization": dict(method="gptq", bits=3)},
    "gptq-w2": {"quantization": dict(method="gptq", bits=2)},
    "ternary-row-base3": {"quantization": dict(method="gptq", ternary=True, group_size=-1, ternary_packing="base3")},
    "ternary-g128-bits": {"quantization": dict(method="gptq", ternary=True, group_size=128, ternary_packing="bits")},
    "mc-2.5bit": {
        "quantization": dict(method="gptq", group_size=128),
        "allocation": dict(method="lp", avg_bits=2.5, candidates=[2, 3, 4]),
    },
}


def paths_ppl(model, tokenizer, max_windows: int) -> dict[str, float]:
    def ppl() -> float:
        return perplexity(model, tokenizer, str(DATA["wiki"]), max_windows=max_windows, progress=False).ppl

    out = {}
    set_dequant_cache(model, True)  # dense copies kept: the torch matmul path
    out["torch"] = ppl()
    set_dequant_cache(model, False)
    saved = native.INT8_TOKENS
    try:
        native.INT8_TOKENS = 0
        out["native fp32"] = ppl()
        native.INT8_TOKENS = native.MAX_TOKENS
        out["native int8"] = ppl()
    finally:
        native.INT8_TOKENS = saved
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"kernels: {native.kernel_name()}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(TEXT)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            recipe = Recipe.from_dict({"name": name, "calibration": {"dataset": CALIB}, **CONFIGS[name]})
            out = Path(tmp) / name
            start = time.perf_counter()
            compress_cli(TEXT, recipe, out, [])
            model = moecompress.load(out)
            row = {"config": name, "compress s": round(time.perf_counter() - start, 1)}
            row.update(paths_ppl(model, tokenizer, args.max_windows))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nWikiText-2 perplexity, first {args.max_windows} windows of 512 tokens; kernels: {native.kernel_name()}")
    print("| checkpoint | torch path | native fp32 | rel. change | native int8 | rel. change |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        fp32, int8 = (r[k] / r["torch"] - 1 for k in ("native fp32", "native int8"))
        print(
            f"| {r['config']} | {r['torch']:.4f} | {r['native fp32']:.4f} | {fp32:+.1e} | "
            f"{r['native int8']:.4f} | {int8:+.1e} |"
        )
    worst = max(abs(r[k] / r["torch"] - 1) for r in rows for k in ("native fp32", "native int8"))
    print(f"largest relative change: {worst:.1e} (target <= 1e-3)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
