"""Foundation benchmark on moe-tiny-text (and moe-tiny-vl with --vl): RTN vs GPTQ at 4 and 3 bits and the
rare-expert policies. Every compressed model is saved, loaded back from disk, then evaluated.

    python eval/bench_foundation.py                     # full table (~25 min on 2 cores)
    python eval/bench_foundation.py --max-windows 50    # quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

import moecompress
from moecompress.evaluation.perplexity import perplexity
from moecompress.models import load_model
from moecompress.recipe import Recipe

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
TEXT = SHARED / "models" / "moe-tiny-text"
VL = SHARED / "models" / "moe-tiny-vl"
DATA = {
    "wiki": SHARED / "data" / "wikitext-2" / "test.txt",
    "python": SHARED / "data" / "heldout-text" / "python_heldout.jsonl",
    "kernel": SHARED / "data" / "heldout-text" / "kernel_heldout.jsonl",
}
CONFIGS = {
    "rtn-w4": dict(method="rtn", bits=4),
    "gptq-w4": dict(method="gptq", bits=4),
    "rtn-w3": dict(method="rtn", bits=3),
    "gptq-w3": dict(method="gptq", bits=3),
    "gptq-w3-rare-own": dict(method="gptq", bits=3, rare_experts={"policy": "own", "min_tokens": 256}),
    "gptq-w3-rare-rtn": dict(method="gptq", bits=3, rare_experts={"policy": "rtn", "min_tokens": 256}),
    "rtn-w2": dict(method="rtn", bits=2),
    "gptq-w2": dict(method="gptq", bits=2),
}


def perplexities(model, tokenizer, max_windows: int | None = None, names=tuple(DATA)) -> dict[str, float]:
    """Perplexity of `model` on the evaluation sets `names` (the first `max_windows` 512-token windows of each)."""
    return {
        name: perplexity(model, tokenizer, str(DATA[name]), max_windows=max_windows, progress=False).ppl
        for name in names
    }


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def compress_cli(model: Path, recipe: Recipe, out: Path, extra: list[str]) -> dict:
    recipe_file = out.parent / f"{recipe.name}.yaml"
    recipe_file.write_text(recipe.to_yaml())
    report = out.parent / f"{recipe.name}.json"
    cmd = [
        sys.executable,
        "-m",
        "moecompress.cli",
        "compress",
        str(model),
        "--recipe",
        str(recipe_file),
        "-o",
        str(out),
        "--json",
        str(report),
        *extra,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--max-windows", type=int)
    parser.add_argument("--vl", action="store_true", help="also GPTQ w4 on moe-tiny-vl with the shapes-vl QA")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    tokenizer = AutoTokenizer.from_pretrained(TEXT)
    rows = []

    def evaluate(model) -> dict:
        return perplexities(model, tokenizer, args.max_windows, args.data)

    base = evaluate(load_model(str(TEXT)).model)
    rows.append({"config": "bf16 (reference)", "bits/param": 16.0, "ckpt MB": folder_bytes(TEXT) / 1e6, **base})
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            recipe = Recipe.from_dict(
                {
                    "name": name,
                    "quantization": CONFIGS[name],
                    "calibration": {"dataset": str(SHARED / "data" / "calib" / "calib_mix.jsonl")},
                }
            )
            out = Path(tmp) / name
            report = compress_cli(TEXT, recipe, out, [])
            model = moecompress.load(out, cache_dequantized=True)
            ppl = evaluate(model)
            rows.append(
                {
                    "config": name,
                    "bits/param": report["result"]["bits_per_expert_param"],
                    "ckpt MB": folder_bytes(out) / 1e6,
                    "compress s": report["wall_seconds"],
                    "peak RSS MB": report["peak_rss_mb"],
                    **ppl,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        if args.vl:
            rows += bench_vl(Path(tmp))
    print_table(rows, ["config", "bits/param", "ckpt MB", "compress s", "peak RSS MB", *args.data, "qa"], base)
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
            "ckpt MB": folder_bytes(VL) / 1e6,
            "qa": vl_qa_accuracy(load_model(str(VL)).model, processor, eval_set, progress=False).accuracy,
        }
    ]
    recipe = Recipe.from_yaml(REPO / "pipelines" / "gptq-w4g128-vl.yaml")
    out = tmp / "vl-w4"
    report = compress_cli(VL, recipe, out, ["--trust-remote-code"])
    model = moecompress.load(out, cache_dequantized=True, trust_remote_code=True)
    rows.append(
        {
            "config": "vl gptq-w4",
            "bits/param": report["result"]["bits_per_expert_param"],
            "ckpt MB": folder_bytes(out) / 1e6,
            "compress s": report["wall_seconds"],
            "peak RSS MB": report["peak_rss_mb"],
            "qa": vl_qa_accuracy(model, processor, eval_set, progress=False).accuracy,
        }
    )
    return rows


def print_table(rows: list[dict], columns: list[str], base: dict) -> None:
    columns = [c for c in columns if any(c in r for r in rows)]
    ratio_cols = [c for c in base if c in columns]
    header = columns + [f"{c}/ref" for c in ratio_cols]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [_fmt(r.get(c)) for c in columns]
        cells += [_fmt(r[c] / base[c]) if c in r and "vl" not in r["config"] else "" for c in ratio_cols]
        print("| " + " | ".join(cells) + " |")


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
