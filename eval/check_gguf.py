"""Our GGUF exports inside llama.cpp, side by side with llama.cpp's own quantizer, on the same model, windows and
token ids.

  python eval/check_gguf.py --llama-cpp /path/to/llama.cpp/build/bin            # everything below
  python eval/check_gguf.py --llama-cpp ... --sections export ppl --types Q4_K Q2_K

Needs the optional extra `[gguf]` (llama-cpp-python) and llama.cpp's tools `llama-quantize` and `llama-imatrix`
(the Python package builds only the library). Both from llama-cpp-python's sdist, whose vendor/llama.cpp is the
llama.cpp it binds (about 10 min on 2 cores):

  pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
  cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF
  cmake --build build -j2 --target llama-quantize llama-imatrix llama mtmd
  CMAKE_ARGS=-DLLAMA_BUILD=OFF pip install --no-deps ./llama_cpp_python-*.tar.gz diskcache
  LLAMA_CPP_LIB_PATH=$PWD/build/bin python eval/check_gguf.py --llama-cpp build/bin

Sections:
  export  every llama.cpp type we quantize onto (Q8_0 Q4_0 Q4_1 Q2_K Q3_K Q4_K Q5_K Q6_K): compress the reference
          model with GPTQ onto it, export the GGUF, load it in llama.cpp; its tensors read back with `gguf`'s own
          dequantization equal our dequantized weights bit for bit, and its logits are ours (llama.cpp quantizes
          activations to 8 bits for its quantized dot products: that is the gap printed).
  ppl     perplexity ratio to the source (its F32 GGUF in llama.cpp) on WikiText-2 test (first --windows windows of
          512 tokens) and the held-out sets, our GGUF vs llama.cpp's quantizer without and with an importance matrix
          (computed by llama-imatrix on the calibration text we calibrate on, as many 512-token chunks), experts in the
          type, everything else F16 on both sides, and the gap we close.
  mixed   (with ppl) our LP mixed-precision GGUF: Q2_K / Q3_K per layer and projection, at most 2.7 bits.
  ternary with --ternary CKPT (a checkpoint of pipelines/ternary-experts.yaml, recovery included): its TQ1_0 and
          TQ2_0 exports in llama.cpp against the checkpoint in our runtime (each against its own source), and
          llama.cpp's own TQ1_0 of the source.
  archs   every mapped architecture (the tests' tiny models) in llama.cpp against transformers and our runtime.
  speed   decode tokens/s: our GGUF in llama.cpp, llama.cpp's own Q4_K, our packed checkpoints in our runtime.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "moe-tiny-text"
CALIB = SHARED / "data" / "calib" / "calib_mix.jsonl"
SETS = {
    "wikitext-2": SHARED / "data" / "wikitext-2" / "test.txt",
    "kernel": SHARED / "data" / "heldout-text" / "kernel_heldout.jsonl",
    "python": SHARED / "data" / "heldout-text" / "python_heldout.jsonl",
}
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
COMPARED = ["Q8_0", "Q4_K", "Q3_K", "Q2_K"]
# LP mixed precision that llama.cpp can hold: a type per (layer, projection), Q2_K / Q3_K, at most 2.7 bits per
# expert weight (avg_bits counts code bits; the budget adds Q2_K's 0.625 bits of scales: 2.695)
MIXED = {"name": "lp-mixed", "avg_bits": 2.07, "candidates": [2, 3], "granularity": "layer-projection"}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed (rc {done.returncode}); see {log}")


def recipe(work: Path, name: str, qtype: str, bits: int, allocation: dict | None = None, samples: int = 128) -> Path:
    data = yaml.safe_load((ROOT / "pipelines" / "gguf-q4_k_m.yaml").read_text())
    data["name"] = name
    data["calibration"]["dataset"] = str(CALIB)
    data["calibration"]["num_samples"] = samples
    data["quantization"].update(packed_format=qtype, bits=bits)
    data["gguf"] = {"default_type": "F16", "tensor_types": {}}  # as llama.cpp's runs below: only experts quantized
    if allocation:
        data["allocation"] = {"method": "lp", "scope": "global", **allocation}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ours(work: Path, name: str, qtype: str, bits: int, allocation: dict | None = None, samples: int = 128) -> Path:
    out, gguf_file = work / name, work / f"{name}.gguf"
    if not gguf_file.exists():
        path = recipe(work, name, qtype, bits, allocation, samples)
        run(
            ["moecompress", "compress", str(MODEL), "--recipe", str(path), "-o", str(out), "--overwrite"],
            work / f"{name}.log",
        )
        run(
            ["moecompress", "export", str(out), "--format", "gguf", "-o", str(gguf_file), "--overwrite"],
            work / f"{name}.export.log",
        )
    return gguf_file


def source_gguf(work: Path) -> Path:
    path = work / "source-f32.gguf"
    if not path.exists():
        run(
            ["moecompress", "export", str(MODEL), "--format", "gguf", "--type", "F32", "-o", str(path)],
            work / "source.log",
        )
    return path


def imatrix(work: Path, tools: Path, chunks: int) -> Path:
    path = work / "imatrix.gguf"
    if not path.exists():
        text = work / "calib.txt"
        text.write_text(
            "\n\n".join(json.loads(line)["text"] for line in CALIB.read_text().splitlines() if line.strip())
        )
        cmd = [str(tools / "llama-imatrix"), "-m", str(source_gguf(work)), "-f", str(text), "-o", str(path)]
        run(cmd + ["-c", "512", "--chunks", str(chunks), "-t", "2"], work / "imatrix.log")
    return path


def llama_quantized(work: Path, tools: Path, qtype: str, imat: Path | None) -> Path:
    path = work / f"llama-{qtype}{'-imatrix' if imat else ''}.gguf"
    if not path.exists():
        # every quantizable tensor in the type (--pure: no mix), but for these, kept at F16 as in our exports
        cmd = [str(tools / "llama-quantize"), "--pure"] + (["--imatrix", str(imat)] if imat else [])
        cmd += ["--tensor-type", "attn_=f16", "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
        cmd += [str(source_gguf(work)), str(path), qtype, "2"]
        run(cmd, work / f"{path.stem}.log")
    return path


def tensor_types(path: Path) -> dict[str, int]:
    """Weights per GGML type in a GGUF file."""
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(np.prod(t.shape))
    return counts


def expert_bits(path: Path) -> float:
    import gguf

    bits = weights = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if "_exps" in t.name:
            bits, weights = bits + t.n_bytes * 8, weights + int(np.prod(t.shape))
    return bits / weights


class Llama:
    """A GGUF file in llama.cpp (the Python binding), evaluated on token ids we give it."""

    def __init__(self, path: Path, n_ctx: int = 512):
        from llama_cpp import Llama as Binding

        self.llm = Binding(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False, n_threads=2
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float64)

    def nll(self, windows: list[list[int]]) -> float:
        total = count = 0.0
        for ids in windows:
            logits = self.logits(ids)[:-1]
            top = logits.max(1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
            total -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
            count += len(ids) - 1
        return total / count

    def decode_rate(self, prompt: list[int], tokens: int) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(tokens):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return tokens / (time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


def token_windows(windows: int) -> dict[str, list[list[int]]]:
    from transformers import AutoTokenizer

    from moecompress.evaluation.perplexity import evaluation_stream

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    out = {}
    for name, path in SETS.items():
        chunks = [w.tolist() for w in evaluation_stream(str(path), tok).split(512) if w.numel() == 512]
        out[name] = chunks[:windows]
    return out


def section_archs(work: Path) -> list[dict]:
    """Every mapped architecture as the tests build it (tests/io/test_gguf_export.py: tiny random models, biases and
    sinks nonzero): its F32 GGUF in llama.cpp against transformers, and (GPT-OSS, DeepSeek-V3) an RTN Q4_K
    checkpoint's GGUF against our runtime; relative logits error over 48 random tokens."""
    sys.path.insert(0, str(ROOT))
    from moecompress import compress, load
    from moecompress.io.gguf_export import export_gguf
    from moecompress.recipe import Recipe
    from tests.io.test_gguf_export import TINY_ARCHS, llama_cpp_vs, tiny_model

    rows = []
    for model_type in TINY_ARCHS:
        folder = work / "archs" / model_type
        model = tiny_model(model_type, folder / "source")
        export_gguf(folder / "source", folder / "f32.gguf", "F32", overwrite=True)
        rows.append({"arch": model_type, "gguf": "F32", "vs": "transformers"})
        rows[-1]["rel_error"] = llama_cpp_vs(model, folder / "f32.gguf", 48)
        if model_type in ("gpt_oss", "deepseek_v3"):
            recipe = {"name": "q4k", "quantization": {"method": "rtn", "packed_format": "Q4_K"}}
            recipe["gguf"] = {"default_type": "F32"}
            compress(str(folder / "source"), Recipe.from_dict(recipe), output=folder / "q4k", overwrite=True)
            export_gguf(folder / "q4k", folder / "q4k.gguf", overwrite=True)
            rows.append({"arch": model_type, "gguf": "Q4_K experts", "vs": "our runtime"})
            rows[-1]["rel_error"] = llama_cpp_vs(load(folder / "q4k"), folder / "q4k.gguf", 48)
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def section_export(work: Path, types: list[str]) -> list[dict]:
    import gguf
    from gguf.quants import dequantize

    from moecompress import load

    rows = []
    ids = torch.randint(1, 8192, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    for qtype in types:
        bits = {"Q8_0": 8, "Q6_K": 6, "Q5_K": 5, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q3_K": 3, "Q2_K": 2}[qtype]
        path = ours(work, f"ours-{qtype}-s32", qtype, bits, samples=32)
        model = load(work / f"ours-{qtype}-s32")
        reader = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
        exact = True
        for layer in range(model.config.num_hidden_layers):
            experts = model.model.layers[layer].mlp.experts
            for proj, kind in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                t = reader[f"blk.{layer}.ffn_{kind}_exps.weight"]
                theirs = dequantize(t.data, t.tensor_type)
                mine = torch.stack([getattr(experts[e], proj).dequantize() for e in range(len(experts))]).numpy()
                exact &= t.tensor_type.name == qtype and np.array_equal(theirs.view(np.uint32), mine.view(np.uint32))
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].double().numpy()
        llm = Llama(path)
        logits = llm.logits(ids)
        llm.close()
        rows.append(
            {
                "type": qtype,
                "bits_per_expert_weight": expert_bits(path),
                "gguf_dequant_bit_exact": exact,
                "logits_rel_err": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
                "argmax_agree": float((logits.argmax(1) == reference.argmax(1)).mean()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def section_ppl(work: Path, tools: Path, types: list[str], windows: int, sections: list[str]) -> list[dict]:
    sets = token_windows(windows)
    imat = imatrix(work, tools, 128)

    def ppl(path: Path) -> dict[str, float]:
        llm = Llama(path)
        out = {name: math.exp(llm.nll(w)) for name, w in sets.items()}
        llm.close()
        return out

    source = ppl(source_gguf(work))
    print(json.dumps({"source": source, "windows": {k: len(v) for k, v in sets.items()}}), flush=True)
    rows = []
    bits = {"Q8_0": 8, "Q4_K": 4, "Q3_K": 3, "Q2_K": 2}
    for qtype in types:
        files = {
            "llama.cpp": llama_quantized(work, tools, qtype, None),
            "llama.cpp+imatrix": llama_quantized(work, tools, qtype, imat),
            "moecompress": ours(work, f"ours-{qtype}", qtype, bits[qtype]),
        }
        rows += [_ppl_row(qtype, who, path, ppl(path), source) for who, path in files.items()]
    if "mixed" in sections:
        mixed = ours(work, MIXED["name"], "Q2_K", 2, {k: v for k, v in MIXED.items() if k != "name"})
        rows.append(_ppl_row("LP Q2_K/Q3_K", "moecompress", mixed, ppl(mixed), source))
    _gap_table(rows)
    return [{"source": source}, *rows]


def _ppl_row(qtype: str, who: str, path: Path, ppl: dict, source: dict) -> dict:
    row = {"type": qtype, "who": who, "bits": round(expert_bits(path), 4)}
    row.update({name: round(ppl[name] / source[name], 5) for name in ppl})
    print(json.dumps(row), flush=True)
    return row


def _gap_table(rows: list[dict]) -> None:
    print(f"\n| type | who | bits/expert weight | {' | '.join(f'{s} ppl/source' for s in SETS)} |")
    print("|---|---|---|" + "---|" * len(SETS))
    for r in rows:
        print(f"| {r['type']} | {r['who']} | {r['bits']} | " + " | ".join(f"{r[s]:.4f}" for s in SETS) + " |")
    print("\ngap closed vs llama.cpp+imatrix, (theirs - ours) / (theirs - 1):")
    by = {(r["type"], r["who"]): r for r in rows}
    for qtype in {r["type"] for r in rows}:
        theirs, mine = by.get((qtype, "llama.cpp+imatrix")), by.get((qtype, "moecompress"))
        if theirs and mine:
            closed = {s: (theirs[s] - mine[s]) / max(theirs[s] - 1, 1e-9) for s in SETS}
            print(f"  {qtype}: " + ", ".join(f"{s} {100 * v:.0f} %" for s, v in closed.items()))


def our_nll(model, windows: list[list[int]]) -> float:
    total = count = 0.0
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return total / count


def section_ternary(work: Path, tools: Path, checkpoint: Path, windows: int) -> list[dict]:
    from moecompress import load
    from moecompress.io.gguf_export import export_gguf
    from moecompress.models.loading import load_model

    sets = token_windows(windows)
    ratio = lambda nll, ref: {s: round(math.exp(nll[s] - ref[s]), 5) for s in sets}  # noqa: E731

    def llama_nll(path: Path) -> dict[str, float]:
        llm = Llama(path)
        out = {s: llm.nll(w) for s, w in sets.items()}
        llm.close()
        return out

    source = llama_nll(source_gguf(work))
    reference = load_model(str(MODEL)).model
    ours_source = {s: our_nll(reference, w) for s, w in sets.items()}
    model = load(checkpoint, cache_dequantized=True)
    rows = [
        {
            "model": "moecompress ternary, our runtime",
            "bits": None,
            **ratio({s: our_nll(model, w) for s, w in sets.items()}, ours_source),
        }
    ]
    for qtype in ("TQ1_0", "TQ2_0"):
        path = work / f"ternary-{qtype}.gguf"
        export_gguf(checkpoint, path, ternary_type=qtype, overwrite=True)
        rows.append(
            {
                "model": f"moecompress ternary as {qtype}, llama.cpp",
                "bits": expert_bits(path),
                **ratio(llama_nll(path), source),
            }
        )
    theirs = llama_quantized(work, tools, "TQ1_0", None)
    rows.append(
        {"model": "llama.cpp TQ1_0 of the source", "bits": expert_bits(theirs), **ratio(llama_nll(theirs), source)}
    )
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def section_speed(work: Path, tools: Path, tokens: int, rounds: int = 3) -> list[dict]:
    """Greedy single-token steps after a 64-token prompt (the prompt untimed on both sides; ours: the compiled
    decode step, compiled before), batch 1, 2 threads; the runtimes alternate, `rounds` times, and the median is
    printed."""
    from bench_decode import ours_rate  # eval/bench_decode.py

    prompt = list(range(100, 164))
    runners = {}
    for name, path in (("our Q4_K GGUF", work / "ours-Q4_K.gguf"), ("llama.cpp's own Q4_K", work / "llama-Q4_K.gguf")):
        llm = Llama(path, n_ctx=len(prompt) + tokens + 8)
        runners[f"llama.cpp: {name}"] = lambda llm=llm: llm.decode_rate(prompt, tokens)
    for name in ("ours-Q4_K", "w4g128"):
        folder = work / name
        if name == "w4g128" and not folder.exists():
            cmd = ["moecompress", "compress", str(MODEL), "--recipe", str(ROOT / "pipelines" / "gptq-w4g128.yaml")]
            run(cmd + ["-o", str(folder), "--overwrite"], work / "w4g128.log")
        runners[f"moecompress: {name}"] = ours_rate(folder, tokens, True, torch.float32)[0]
    rates = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            rates[name].append(runner())
    rows = [{"runtime": name, "tokens_per_s": float(np.median(r)), "runs": r} for name, r in rates.items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, type=Path, help="folder with llama-quantize and llama-imatrix")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moecompress-gguf"))
    parser.add_argument("--sections", nargs="+", default=["export", "ppl", "mixed", "speed"])
    parser.add_argument("--types", nargs="+", help="types of the export section (default: all) or ppl (Q8_0 Q4_K ...)")
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--ternary", type=Path, help="ternary checkpoint for the ternary section")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(args.llama_cpp))
    torch.set_num_threads(2)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    if "archs" in args.sections:
        results["archs"] = section_archs(args.work)
    if "export" in args.sections:
        results["export"] = section_export(args.work, args.types or TYPES)
    if "ppl" in args.sections:
        results["ppl"] = section_ppl(args.work, args.llama_cpp, args.types or COMPARED, args.windows, args.sections)
    if "ternary" in args.sections:
        results["ternary"] = section_ternary(args.work, args.llama_cpp, args.ternary, args.windows)
    if "speed" in args.sections:
        results["speed"] = section_speed(args.work, args.llama_cpp, args.decode_tokens)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
