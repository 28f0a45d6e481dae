"""Mixed-precision allocation benchmark (one table):

1. solver speed on a synthetic problem of 64 layers x 256 experts x 5 candidates (per-layer and global);
2. moe-tiny-text at 2.5 and 3.0 average bits: integer-program allocation (per-layer and global budget)
   vs the same checkpoint size spread at random or by routing frequency; GPTQ g128 for all, every model
   saved, reloaded and evaluated on WikiText-2 and the held-out python / kernel sets;
3. with --vl: moe-tiny-vl at 2.5 bits, per-modality importance (text + image) vs text-only importance.

    python eval/bench_allocation.py                   # ~30 min on 2 cores
    python eval/bench_allocation.py --max-windows 60  # quick look
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

import moecompress
from moecompress.allocation import allocate, solve_allocation
from moecompress.evaluation.perplexity import perplexity
from moecompress.models import load_model
from moecompress.pipeline import calibration_batches, plan_allocation
from moecompress.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TEXT, VL = SHARED / "models" / "moe-tiny-text", SHARED / "models" / "moe-tiny-vl"
DATA = {
    "wiki": SHARED / "data" / "wikitext-2" / "test.txt",
    "python": SHARED / "data" / "heldout-text" / "python_heldout.jsonl",
    "kernel": SHARED / "data" / "heldout-text" / "kernel_heldout.jsonl",
}
CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")


def solver_speed() -> list[dict]:
    torch.manual_seed(0)
    layers, experts, bits = 64, 256, [1.6, 2.0, 3.0, 4.0, 8.0]
    n = layers * experts
    error = torch.rand(n, 1, dtype=torch.float64) * torch.tensor([[14.0, 8, 2, 0.5, 0.01]], dtype=torch.float64)
    costs = torch.rand(n, 1, dtype=torch.float64) ** 3 * error
    sizes = torch.full((n,), 3.0 * 2048 * 768, dtype=torch.float64)
    rows = []
    for scope in ("layer", "global"):
        groups = torch.arange(n) // experts if scope == "layer" else torch.zeros(n, dtype=torch.long)
        budgets = {int(g): 2.5 * float(sizes[groups == g].sum()) for g in groups.unique()}
        start = time.perf_counter()
        choice = solve_allocation(costs, sizes, bits, groups, budgets)
        avg = float((torch.tensor(bits, dtype=torch.float64)[choice] * sizes).sum() / sizes.sum())
        rows.append({"config": f"solver 64x256x5 {scope}", "solve s": time.perf_counter() - start, "avg bits": avg})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def text_rows(args, tmp: Path) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(TEXT)
    recipe = Recipe.from_dict(
        {"name": "alloc", "calibration": {"dataset": CALIB}, "allocation": {"method": "lp", "candidates": [2, 3, 4]}}
    )
    loaded = load_model(str(TEXT))
    batches = calibration_batches(loaded, recipe.calibration)
    start = time.perf_counter()
    _, stats = plan_allocation(loaded, recipe, batches, progress=False)
    profile_s = time.perf_counter() - start
    rows = []
    for avg in args.avg_bits:
        for method, scope in (("lp", "layer"), ("lp", "global"), ("random", "global"), ("frequency", "global")):
            config = Recipe.from_dict(
                {"allocation": {"method": method, "scope": scope, "avg_bits": avg, "candidates": [2, 3, 4]}}
            ).allocation
            plan = allocate(stats, config)
            out = tmp / f"{method}-{scope}-{avg}"
            t0 = time.perf_counter()
            result = moecompress.compress(str(TEXT), recipe, out, progress=False, plan=plan)
            seconds = time.perf_counter() - t0
            model = moecompress.load(out, cache_dequantized=True)
            ppl = {
                k: perplexity(model, tokenizer, str(DATA[k]), max_windows=args.max_windows, progress=False).ppl
                for k in DATA
            }
            rows.append(
                {
                    "config": f"{method} {scope} @{avg}",
                    "avg bits": plan.average_bits,
                    "bits/param": result.report.bits_per_expert_param,
                    "compress s": seconds,
                    "profile s": profile_s,
                    **ppl,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def vl_rows(tmp: Path) -> list[dict]:
    from moecompress.evaluation.vlqa import vl_qa_accuracy
    from moecompress.pipeline import load_tokenizer_or_processor

    processor = load_tokenizer_or_processor(str(VL), True, trust_remote_code=True)
    eval_set = str(SHARED / "data" / "shapes-vl" / "eval.jsonl")
    rows = []
    for label, weights in (
        ("text+image importance", {"text": 1.0, "image": 1.0}),
        ("text-only importance", {"text": 1.0, "image": 0.0}),
    ):
        recipe = Recipe.from_dict(
            {
                "name": "vl-alloc",
                "calibration": {"dataset": CALIB, "vl_dataset": str(SHARED / "data" / "shapes-vl" / "calib.jsonl")},
                "allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4], "modality_weights": weights},
            }
        )
        out = tmp / label.split()[0]
        result = moecompress.compress(str(VL), recipe, out, trust_remote_code=True, progress=False)
        model = moecompress.load(out, cache_dequantized=True, trust_remote_code=True)
        rows.append(
            {
                "config": f"vl lp @2.5 {label}",
                "avg bits": result.report.code_bits_per_expert_param,
                "bits/param": result.report.bits_per_expert_param,
                "qa": vl_qa_accuracy(model, processor, eval_set, progress=False).accuracy,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--avg-bits", type=float, nargs="+", default=[2.5, 3.0])
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--vl", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = solver_speed()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_text:
            rows += text_rows(args, Path(tmp))
        if args.vl:
            rows += vl_rows(Path(tmp))
    columns = ["config", "solve s", "avg bits", "bits/param", "profile s", "compress s", *DATA, "qa"]
    columns = [c for c in columns if any(c in r for r in rows)]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print(
            "| "
            + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)
            + " |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
