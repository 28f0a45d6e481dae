"""Factored experts (issue 20) at equal expert bytes: on moe-tiny-text (wiki / python / kernel perplexity) and, with
--vl, moe-tiny-vl (shapes-vl QA accuracy), at 75 % and 50 % of the w4g128 expert bytes and of the bf16 expert bytes:

  factored        `factor:` with its defaults: per expert projection a low-rank delta (whitened truncation, as
                  SVD-LLM), a dense delta or none, to a quantized shared base or to none, every width and rank
                  chosen by the integer program under the byte budget (the "chosen" column)
  factored, shared w4 base   the same with the shared base forced (D²-MoE's base + deltas)
  factored plain  the same as "factored" with plain (Frobenius) truncation
  prune           NAEE pruning of the same share of experts (+ GPTQ w4 at the w4 budgets; bf16 at the bf16 ones)
  average         dominant-anchored averaging of the same share (MC-SMoE), likewise
  uniform GPTQ    every expert at the smallest uniform format that is at least the budget (w3g128 for 3.14 bits,
                  w2g128 for 2.09, w8g128 for 12 and 8): never fewer bytes than the others

Every model is compressed by `moecompress.compress`, saved, loaded back and evaluated; the measured stored bits per
expert parameter are printed beside the budget. For the text rows a second table compares every factored row with
each other method at its budget point on the same windows: the perplexity ratio and the standard error of its log
(paired over the windows, so the windows' own difficulty cancels), and how many standard errors apart they are.

    python eval/bench_factored.py --max-windows 40          # ~20 min on 2 cores
    python eval/bench_factored.py --vl-only                 # moe-tiny-vl rows, ~20 min
    python eval/bench_factored.py --max-windows 0 --points "75% of w4" --methods factored prune   # every window
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from bench_foundation import DATA, SHARED, TEXT, VL, print_table
from transformers import AutoTokenizer

import moecompress
from moecompress.evaluation.perplexity import paired_difference, perplexity
from moecompress.models import load_model
from moecompress.recipe import Recipe

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")
VL_CALIB = str(SHARED / "data" / "shapes-vl" / "calib.jsonl")
VL_EVAL = str(SHARED / "data" / "shapes-vl" / "eval.jsonl")


def _storage(bits: int) -> float:
    """Stored bits per parameter of a w{bits}g128 asym matrix: codes, an fp16 scale and a uint8 zero per 128."""
    return bits + 24 / 128


W4 = _storage(4)
# (label, budget in stored bits per expert parameter, share of experts kept by pruning/averaging, their bits)
POINTS = [
    ("75% of w4", 0.75 * W4, 0.75, 4),
    ("50% of w4", 0.50 * W4, 0.50, 4),
    ("75% of bf16", 12.0, 0.75, None),
    ("50% of bf16", 8.0, 0.50, None),
]
UNIFORM = {"75% of w4": 3, "50% of w4": 2, "75% of bf16": 8, "50% of bf16": 8}


def recipes(label: str, budget: float, kept: float, bits: int | None, methods: list[str] | None, vl: bool) -> dict:
    """The recipe sections of every row at one budget point (a text model has one calibration source: balancing
    them changes nothing there)."""
    quantized = {"method": "gptq", "bits": bits} if bits else {"method": "none"}
    rows = {
        "factored": {"factor": {"enabled": True, "avg_bits": budget}},
        "factored, shared w4 base": {"factor": {"enabled": True, "avg_bits": budget, "base_bits": [4]}},
        "factored plain": {"factor": {"enabled": True, "avg_bits": budget, "whiten": False}},
        **({"factored, unbalanced": {"factor": {"enabled": True, "avg_bits": budget, "balance": False}}} if vl else {}),
        "prune": {"merge": {"method": "prune", "ratio": 1 - kept}, "quantization": quantized},
        "average": {
            "merge": {"method": "average", "ratio": 1 - kept, "clustering": "dominant"},
            "quantization": quantized,
        },
        f"uniform GPTQ w{UNIFORM[label]}": {"quantization": {"method": "gptq", "bits": UNIFORM[label]}},
    }
    if vl:  # the factor stage limited to dense deltas of one width and no base is GPTQ at that width with the factor
        # stage's source-balanced Grams: uniform GPTQ calibrated as the factored rows are
        w = UNIFORM[label]
        rows[f"uniform GPTQ w{w}, balanced"] = {
            "factor": {"enabled": True, "avg_bits": _storage(w), "bits": [w], "base_bits": [0], "rank_steps": 1}
        }
    return {k: v for k, v in rows.items() if not methods or any(m in k for m in methods)}


def run(source: Path, sections: dict, calibration: dict, out: Path, evaluate, vl: bool, params: int) -> dict:
    """Compress, save, load back, evaluate; stored bits per expert parameter *of the source* (pruned and merged
    experts count as stored in zero bytes), and what the factored allocation chose."""
    recipe = Recipe.from_dict({"name": "bench", "calibration": calibration, **sections})
    result = moecompress.compress(str(source), recipe, output=out, overwrite=True, progress=False, trust_remote_code=vl)
    model = moecompress.load(out, cache_dequantized=True, trust_remote_code=vl)
    row = {"bits/param": 8 * result.report.expert_bytes / params}
    if result.report.factor:
        blocks = result.report.factor["blocks"].values()
        share = {k: sum(b["deltas"][k] for b in blocks) for k in ("dense", "low_rank", "none")}
        chosen = " / ".join(f"{k.replace('_', '-')} {v / sum(share.values()):.0%}" for k, v in share.items())
        row["chosen"] = f"{chosen}; base in {sum(b['base'] is not None for b in blocks)} of {len(blocks)} blocks"
    return {**row, **evaluate(model)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-windows", type=int, default=40, help="first N 512-token windows of each set; 0: all")
    parser.add_argument("--points", nargs="+", help="labels of the budget points to run (default: all)")
    parser.add_argument("--methods", nargs="+", help="substrings of the row names to run (default: all)")
    parser.add_argument("--vl", action="store_true", help="also the moe-tiny-vl rows")
    parser.add_argument("--vl-only", action="store_true", help="only the moe-tiny-vl rows")
    parser.add_argument("--json")
    args = parser.parse_args()
    points = [p for p in POINTS if not args.points or p[0] in args.points]
    models = ([] if args.vl_only else [(TEXT, False)]) + ([(VL, True)] if args.vl or args.vl_only else [])
    rows: list[dict] = []
    for source, vl in models:
        evaluate = _vl_evaluator() if vl else _text_evaluator(args.max_windows or None)
        name = "vl " if vl else ""
        calibration = {"dataset": CALIB, **({"vl_dataset": VL_CALIB} if vl else {})}
        reference = load_model(str(source))
        params = sum(v.expert_params for v in reference.adapter.moe_blocks(reference.model))
        rows.append({"config": f"{name}bf16 reference", "bits/param": 16.0, **evaluate(reference.model)})
        print(json.dumps(_public(rows[-1])), flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            for label, budget, kept, bits in points:
                for method, sections in recipes(label, budget, kept, bits, args.methods, vl).items():
                    row = {"config": f"{name}{label} ({budget:.2f} bits): {method}"}
                    row.update(run(source, sections, calibration, Path(tmp) / "model", evaluate, vl, params))
                    rows.append(row)
                    print(json.dumps(_public(row)), flush=True)
    base = next((r for r in rows if r["config"] == "bf16 reference"), {})
    print_table(rows, ["config", "bits/param", *DATA, "qa", "chosen"], {k: v for k, v in base.items() if k in DATA})
    print_paired(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([_public(r) for r in rows], indent=1))


def print_paired(rows: list[dict]) -> None:
    """Per budget point, every factored text row against every other row of the point, set by set: the perplexity
    ratio and (z) how many standard errors of its log, paired over the windows, it is from 1 (negative: the factored
    row is better)."""
    points = {}
    for row in rows:
        if "_windows" in row and ": " in row["config"]:
            label, method = row["config"].split(": ", 1)
            points.setdefault(label, {})[method] = row["_windows"]
    print("\n| point | factored row | against | " + " | ".join(f"{d}: ratio (z)" for d in DATA) + " |")
    print("|" + "---|" * (3 + len(DATA)))
    for label, methods in points.items():
        for mine in (m for m in methods if m.startswith("factored")):
            for other in (m for m in methods if not m.startswith("factored")):
                cells = []
                for d in DATA:
                    delta, stderr = paired_difference(methods[mine][d], methods[other][d])
                    cells.append(f"{math.exp(delta):.4f} ({delta / stderr if stderr else 0:+.1f})")
                print(f"| {label} | {mine} | {other} | " + " | ".join(cells) + " |")


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def _text_evaluator(max_windows: int | None):
    tokenizer = AutoTokenizer.from_pretrained(TEXT)

    def evaluate(model) -> dict:
        results = {
            name: perplexity(model, tokenizer, str(path), max_windows=max_windows, progress=False)
            for name, path in DATA.items()
        }
        return {**{name: r.ppl for name, r in results.items()}, "_windows": results}

    return evaluate


def _vl_evaluator():
    from moecompress.evaluation.vlqa import vl_qa_accuracy
    from moecompress.pipeline import load_tokenizer_or_processor

    processor = load_tokenizer_or_processor(str(VL), True, trust_remote_code=True)
    return lambda model: {"qa": vl_qa_accuracy(model, processor, VL_EVAL, progress=False).accuracy}


if __name__ == "__main__":
    main()
