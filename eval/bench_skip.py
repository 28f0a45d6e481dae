"""Dynamic expert skipping (issue 6) on moe-tiny-text: fraction of routed-expert activations removed vs
perplexity for MC ODP, MoDES and the learned top-any mask at three targets; with --vl on moe-tiny-vl,
MoDES with per-modality thresholds vs one shared threshold at the same skip ratio (shapes-vl QA).
The skip ratio reported is the one measured on the evaluation data, not the calibration target.

    python eval/bench_skip.py --max-windows 100 --vl      # ~20 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_foundation import DATA, SHARED, TEXT, VL, perplexities, print_table
from transformers import AutoTokenizer

from moecompress.dynamic.skip import SkipConfig, cut_learned_mask, fit_skipping
from moecompress.models import load_model
from moecompress.pipeline import calibration_batches
from moecompress.recipe import Recipe

CALIB = str(SHARED / "data" / "calib" / "calib_mix.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--targets", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--max-windows", type=int, help="evaluate the first N 512-token windows of each set")
    parser.add_argument("--learned-steps", type=int, default=200)
    parser.add_argument("--vl", action="store_true")
    parser.add_argument("--vl-only", action="store_true")
    parser.add_argument(
        "--methods", nargs="+", default=["odp", "modes", "learned"], choices=["odp", "modes", "learned"]
    )
    parser.add_argument("--vl-targets", nargs="+", type=float, default=[0.3, 0.5])
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.vl_only:
        rows = bench_vl(args.vl_targets)
        print_table(rows, ["config", "skipped", "skipped text", "skipped image", "calib KL", "qa"], {})
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return
    tokenizer = AutoTokenizer.from_pretrained(TEXT)
    loaded = load_model(str(TEXT))
    batches = calibration_batches(
        loaded,
        Recipe.from_dict(
            {"calibration": {"dataset": CALIB, "num_samples": 64, "seq_len": 512, "batch_size": 4}}
        ).calibration,
    )

    def evaluate(controller=None) -> dict:
        if controller is not None:
            controller.reset_stats()
        row = perplexities(loaded.model, tokenizer, args.max_windows)
        if controller is not None:
            row["skipped"] = controller.stats.skipped()
        return row

    base = evaluate()
    rows = [{"config": "bf16, top-2 (reference)", "skipped": 0.0, **base}]
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods:
        controller = None
        for target in args.targets:
            start = time.perf_counter()
            if method == "learned" and controller is not None:
                cut_learned_mask(controller, batches, target)  # same predictors, cut moved to the new target
            else:
                controller = fit_skipping(
                    loaded.model,
                    loaded.adapter,
                    batches,
                    SkipConfig(method=method, target=target, steps=args.learned_steps),
                    progress=False,
                )
            row = {
                "config": f"{method} target {target:.0%}",
                "fit s": time.perf_counter() - start,
                "calib KL": controller.rule.calibration_kl,
                **evaluate(controller),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        controller.remove()
    if args.vl:
        rows += bench_vl(args.vl_targets)
    print_table(rows, ["config", "skipped", "skipped text", "skipped image", "calib KL", "fit s", *DATA, "qa"], base)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def bench_vl(targets: list[float]) -> list[dict]:
    from moecompress.evaluation.vlqa import vl_qa_accuracy
    from moecompress.pipeline import load_tokenizer_or_processor

    loaded = load_model(str(VL), trust_remote_code=True)
    processor = load_tokenizer_or_processor(str(VL), True, trust_remote_code=True)
    eval_set = str(SHARED / "data" / "shapes-vl" / "eval.jsonl")
    recipe = Recipe.from_dict(
        {
            "calibration": {
                "dataset": CALIB,
                "num_samples": 16,
                "seq_len": 256,
                "batch_size": 4,
                "vl_dataset": str(SHARED / "data" / "shapes-vl" / "calib.jsonl"),
                "vl_num_samples": 32,
            }
        }
    )
    batches = calibration_batches(loaded, recipe.calibration, trust_remote_code=True)
    rows = [
        {
            "config": "vl bf16 (reference)",
            "skipped": 0.0,
            "qa": vl_qa_accuracy(loaded.model, processor, eval_set, progress=False).accuracy,
        }
    ]
    print(json.dumps(rows[-1]), flush=True)
    for target in targets:
        for label, config in (
            ("odp", SkipConfig(method="odp", target=target)),
            ("modes shared threshold", SkipConfig(method="modes", target=target, per_modality=False)),
            ("modes per-modality thresholds", SkipConfig(method="modes", target=target, frontier_points=5)),
        ):
            if label == "odp" and target > 0.5:
                continue
            controller = fit_skipping(loaded.model, loaded.adapter, batches, config, progress=False)
            controller.reset_stats()
            qa = vl_qa_accuracy(loaded.model, processor, eval_set, progress=False).accuracy
            rows.append(
                {
                    "config": f"vl {label} target {target:.0%}",
                    "skipped": controller.stats.skipped(),
                    "skipped text": controller.stats.skipped("text"),
                    "skipped image": controller.stats.skipped("image"),
                    "calib KL": controller.rule.calibration_kl,
                    "qa": qa,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            controller.remove()
    return rows


if __name__ == "__main__":
    main()
