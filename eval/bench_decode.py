"""Decode speed side by side, batch 1, greedy: our runtime (eager and compiled decode step, `runtime/decode.py`)
against transformers' own forward on the source model and against llama.cpp on GGUF exports of the same model (when
llama-cpp-python, the optional extra `[gguf]`, is usable: LLAMA_CPP_LIB_PATH=... for a library built apart).

    python eval/bench_decode.py                           # moe-tiny-text, 2 threads
    python eval/bench_decode.py --model synthetic --threads 1 2

Every runtime decodes `--tokens` tokens after the same 64-token prompt (the prompt and, for the compiled step, its
first compiling call untimed), the runtimes alternate `--rounds` times, and the median tokens/s is printed with
the ratio to llama.cpp's. Checkpoints (RTN: the speed does not depend on how the codes were chosen) and GGUFs are
made once in --work. Compared, same tensors quantized: our w4 g128 experts with the rest float32 or bfloat16 vs
llama.cpp's Q4_K experts with the rest F16 (our own Q4_K export), and vs its Q4_K_M mix (gguf-q4_k_m types). Then,
compiled (`--no-variants` leaves them out): w4 with the attention and LM head quantized (`dense:` w8 or w4), uniform
w2, an LP 2.5-bit mix of 2-, 3- and 4-bit experts, ternary experts, the LP mix with dense w4 (llama.cpp has no
per-expert mix and no base-3 ternary)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT.parent / "shared" / "models" / "moe-tiny-text"
CALIBRATION = ROOT.parent / "shared" / "data" / "calib" / "calib_mix.jsonl"
PROMPT = list(range(100, 164))


def checkpoint(work: Path, source: Path, name: str, quantization: dict, **sections) -> Path:
    from moecompress import compress
    from moecompress.recipe import Recipe

    out = work / name
    if not (out / "moecompress.json").is_file():
        calibration = {"dataset": str(CALIBRATION), "num_samples": 16, "seq_len": 256}
        recipe = {"name": name, "calibration": calibration, "quantization": {"method": "rtn", **quantization}}
        compress(str(source), Recipe.from_dict({**recipe, **sections}), output=out)
    return out


# Ours beside the w4 rows, compiled, float32 activations: (name, quantization, other recipe sections).
# The LP allocation profiles each expert's error on the calibration data; RTN rounds (speed only).
VARIANTS = [
    ("w4g128 + dense w8g128", {"bits": 4}, {"dense": {"bits": 8, "method": "rtn"}}),
    ("w4g128 + dense w4g128", {"bits": 4}, {"dense": {"bits": 4, "method": "rtn"}}),
    ("w2g128", {"bits": 2}, {}),
    ("LP 2.5-bit (2/3/4)", {}, {"allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4]}}),
    ("ternary g128", {"ternary": True}, {}),
    (
        "LP 2.5-bit + dense w4g128",
        {},
        {
            "allocation": {"method": "lp", "avg_bits": 2.5, "candidates": [2, 3, 4]},
            "dense": {"bits": 4, "method": "rtn"},
        },
    ),
]


def gguf_file(work: Path, ckpt: Path, name: str) -> Path:
    from moecompress.io.gguf_export import export_gguf

    path = work / f"{name}.gguf"
    if not path.is_file():
        export_gguf(ckpt, path)
    return path


def llama_cpp_usable() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as exc:
        return str(exc)
    return None


def llama_rate(path: Path, tokens: int, threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(PROMPT) + tokens + 8, n_threads=threads, verbose=False)

    def rate() -> float:
        llm.reset()
        llm.eval(PROMPT)
        start = time.perf_counter()
        for _ in range(tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return tokens / (time.perf_counter() - start)

    return rate


def ours_rate(path: Path, tokens: int, compiled: bool, dtype: torch.dtype, dense_dtype: torch.dtype | None = None):
    from moecompress import load
    from moecompress.runtime.decode import Decoder

    decoder = Decoder(load(path, dtype=dtype, dense_dtype=dense_dtype), len(PROMPT) + tokens + 2, compile=compiled)
    _, first = decoder.generate(torch.tensor([PROMPT]), 4)  # compiles (or loads the compiled graph) untimed
    report = {"compile_s": first.compile_s, "first_token_s": first.prefill_s, "path": first.path}
    return (lambda: decoder.generate(torch.tensor([PROMPT]), tokens + 2)[1].tokens_per_s), report


def transformers_rate(source: Path, tokens: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()

    def rate() -> float:
        with torch.no_grad():
            out = model(torch.tensor([PROMPT]), use_cache=True)
            start = time.perf_counter()
            for _ in range(tokens):
                step = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(step, past_key_values=out.past_key_values, use_cache=True)
        return tokens / (time.perf_counter() - start)

    return rate


def source_model(args) -> Path:
    if args.model == "tiny":
        return TINY
    out = args.work / "synthetic-8x32"
    if not (out / "config.json").is_file():
        cmd = [sys.executable, str(ROOT / "eval" / "synthetic.py"), str(out), "--layers", "8", "--experts", "32"]
        subprocess.run(cmd + ["--hidden", "1024", "--intermediate", "512", "--top-k", "4"], check=True)
    return out


def bench(args, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    source = source_model(args)
    w4 = checkpoint(args.work, source, f"{args.model}-w4g128", {"bits": 4, "group_size": 128})
    runners, reports = {}, {}
    runners["transformers, source float32"] = transformers_rate(source, args.tokens)
    for dtype in (torch.float32, torch.bfloat16):
        for compiled in (False, True):
            name = f"moecompress w4g128, rest {str(dtype)[6:]}, {'compiled' if compiled else 'eager'}"
            runners[name], reports[name] = ours_rate(w4, args.tokens, compiled, dtype)
    name = "moecompress w4g128, rest bfloat16 weights (float32 activations), compiled"
    runners[name], reports[name] = ours_rate(w4, args.tokens, True, torch.float32, torch.bfloat16)
    for label, quantization, sections in VARIANTS if args.variants else []:
        ckpt = checkpoint(
            args.work, source, f"{args.model}-{label.replace(' ', '_').replace('/', '')}", quantization, **sections
        )
        name = f"moecompress {label}, rest float32, compiled"
        runners[name], reports[name] = ours_rate(ckpt, args.tokens, True, torch.float32)
    if (why := llama_cpp_usable()) is None:
        q4k = checkpoint(
            args.work, source, f"{args.model}-q4k", {"packed_format": "Q4_K"}, gguf={"default_type": "F16"}
        )
        runners["llama.cpp Q4_K experts, rest F16"] = llama_rate(
            gguf_file(args.work, q4k, q4k.name), args.tokens, threads
        )
        mix = yaml_gguf_section(ROOT / "pipelines" / "gguf-q4_k_m.yaml")
        q4km = checkpoint(args.work, source, f"{args.model}-q4km", {"packed_format": "Q4_K"}, gguf=mix)
        runners["llama.cpp Q4_K_M mix"] = llama_rate(gguf_file(args.work, q4km, q4km.name), args.tokens, threads)
    else:
        print(f"llama.cpp not compared: {why}", file=sys.stderr)
    rates = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            rates[name].append(runner())
    base = np.median(rates.get("llama.cpp Q4_K experts, rest F16", [np.nan]))
    rows = []
    for name, r in rates.items():
        row = {"model": args.model, "threads": threads, "runtime": name, "tokens_per_s": round(float(np.median(r)), 1)}
        row.update(vs_llama_cpp_q4k=round(float(np.median(r) / base), 3), runs=[round(x, 1) for x in r])
        rows.append({**row, **reports.get(name, {})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def yaml_gguf_section(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())["gguf"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "synthetic"], default="tiny")
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moecompress-decode"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-variants", dest="variants", action="store_false", help="only the w4 rows and the peers")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [row for threads in args.threads for row in bench(args, threads)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
