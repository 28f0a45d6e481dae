"""Frontier-scale MoE layers on this machine: a layer's experts a chunk at a time under a memory budget, and over
expert-parallel ranks.

Builds once (kept in --work) synthetic checkpoints (random bf16 weights, see eval/synthetic.py): a one-layer
DeepSeek-V3-shaped one, 256 experts x (7168 x 2048), top-8, 22.5 GB of experts; a one-layer many-expert one, 256 x
(2048 x 768), top-8 (2.4 GB bf16, 4.8 GB in float32); and an 8-layer one, 8 x 32 x (2048 x 768). Each run is the
CLI in a fresh process; prints its budget, plan, peak RSS (the child's VmHWM, or each rank's) and wall time:

- RTN w4 of the DeepSeek-V3-shaped layer under --max-memory 6GB, then `moecompress.load` of its output and a
  256-token forward;
- RTN w4 of the many-expert layer whole and in chunks of 16 experts, side by side: the quantize stage's seconds
  per expert parameter, their ratio, and whether the tensors are equal (sha256);
- GPTQ w4 of the many-expert layer under a budget half its float32 experts, against an unconstrained run;
- 2 gloo ranks x 1 thread against 1 process x 2 threads and x 1 thread (`--ranks 2`): GPTQ w4 of the 8-layer
  model and RTN w4 of the many-expert layer: wall time, its ratio, each rank's peak RSS, and
  whether the tensors equal the 2 ranks' (sha256);
- the projected GPTQ w4 time of the whole DeepSeek-V3 and Kimi-K2 on N workers, from GPTQ of one expert at their
  shape and the per-expert cost of the chunked run measured here (assumptions printed with it).

    python eval/bench_frontier.py [--work /tmp/moecompress-frontier] [--skip deepseek chunking gptq ranks projection]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from bench_gptq import best, hessian
from bench_scale import compress, folder_bytes, load_rss, tensor_hashes
from safetensors import safe_open
from synthetic import build

import moecompress
from moecompress.calibration.budget import MemoryPlan
from moecompress.formats import IntFormat
from moecompress.quant import gptq

SOURCES = {  # name: (layers, experts, hidden, intermediate, top_k)
    "deepseek-v3-layer": (1, 256, 7168, 2048, 8),
    "many-experts-layer": (1, 256, 2048, 768, 8),
    "eight-layers": (8, 32, 2048, 768, 8),
}
FULL = {  # name: (MoE layers, routed experts, intermediate, hidden)
    "DeepSeek-V3": (58, 256, 2048, 7168),
    "Kimi-K2": (60, 384, 2048, 7168),
}


def source(work: Path, name: str) -> Path:
    folder = work / name
    if not (folder / "config.json").is_file():
        print(f"building {folder} (once) ...", file=sys.stderr)
        build(folder, *SOURCES[name])
    return folder


def expert_bytes(src: Path, dtype_bytes: int) -> int:
    _, experts, hidden, inter, _ = SOURCES[src.name]
    return experts * 3 * hidden * inter * dtype_bytes


def describe(r: dict) -> str:
    return MemoryPlan(**r["memory"]).describe()


def expert_errors(src: Path, out: Path, experts: list[int]) -> list[str]:
    """||dequantized - source|| / ||source|| of some experts' gate and down projections, read back through
    `moecompress.load` (an expert stored under another's number would be ~1.4)."""
    model = moecompress.load(out, dtype=torch.bfloat16)
    packed, found = model.model.layers[0].mlp.experts, []
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for e in experts:
        for proj in ("gate_proj", "down_proj"):
            key = f"model.layers.0.mlp.experts.{e}.{proj}.weight"
            with safe_open(str(src / index[key]), "pt") as f:
                w = f.get_tensor(key).double()
            found.append(f"{float((getattr(packed[e], proj).dequantize(torch.float64) - w).norm() / w.norm()):.4f}")
    return found


def deepseek(work: Path, budget: str) -> float:
    """RTN w4 of the DeepSeek-V3-shaped layer under `budget`; its seconds per expert."""
    src = source(work, "deepseek-v3-layer")
    r = compress(src, work / "deepseek-rtn", "rtn", ["--max-memory", budget])
    print(
        f"\nDeepSeek-V3-shaped layer, {expert_bytes(src, 2) / 1e9:.1f} GB of bf16 experts, RTN w4 --max-memory {budget}"
    )
    print(f"  plan: {describe(r)}")
    print(
        f"  peak RSS {r['rss_gb']:.2f} GB, wall {r['seconds']:.0f} s, output {folder_bytes(work / 'deepseek-rtn') / 1e9:.2f} GB"
    )
    errors = expert_errors(src, work / "deepseek-rtn", [0, 130, 255])
    print(f"  relative error of experts 0, 130, 255 (gate, down) against the source: {', '.join(errors)}")
    load = load_rss(work / "deepseek-rtn", "bfloat16")
    print(
        f"  moecompress.load: peak RSS {load['loaded']:.2f} GB loaded, {load['peak']:.2f} GB after a 256-token forward"
    )
    return r["stage_seconds"]["quantize"] / SOURCES["deepseek-v3-layer"][1]


def chunking(work: Path) -> None:
    """The many-expert layer (it fits whole): RTN w4 whole and in chunks of 16, twice each, alternating."""
    src = source(work, "many-experts-layer")
    _, experts, hidden, inter, _ = SOURCES[src.name]
    params = experts * 3 * hidden * inter
    runs = {"whole": [], "chunks of 16": []}
    for _ in range(2):
        runs["whole"].append(compress(src, work / "many-rtn-whole", "rtn"))
        runs["chunks of 16"].append(compress(src, work / "many-rtn-chunked", "rtn", ["--experts-per-chunk", "16"]))
    print(f"\nmany-expert layer ({experts} x ({hidden} x {inter})), RTN w4, quantize stage, best of 2")
    per = {}
    for label, rs in runs.items():
        per[label] = min(r["stage_seconds"]["quantize"] for r in rs) / params * 1e9
        print(
            f"  {label}: {per[label]:.2f} ns per expert parameter; plan: {describe(rs[0])}; peak RSS {rs[0]['rss_gb']:.2f} GB"
        )
    same = tensor_hashes(work / "many-rtn-whole") == tensor_hashes(work / "many-rtn-chunked")
    print(f"  chunked / whole: {per['chunks of 16'] / per['whole']:.3f}x (target <= 1.15x); tensors identical: {same}")


def gptq_budget(work: Path) -> None:
    """GPTQ w4 of the many-expert layer under half its float32 experts, against an unconstrained run."""
    src = source(work, "many-experts-layer")
    f32 = expert_bytes(src, 4)
    budget = f"{f32 / 2 / 1e9:.2f}GB"
    free = compress(src, work / "many-gptq-free", "gptq")
    tight = compress(src, work / "many-gptq-budget", "gptq", ["--max-memory", budget])
    same = tensor_hashes(work / "many-gptq-free") == tensor_hashes(work / "many-gptq-budget")
    print(f"\nmany-expert layer, GPTQ w4: float32 experts {f32 / 1e9:.2f} GB, budget {budget}")
    for label, r in (("unconstrained", free), (f"--max-memory {budget}", tight)):
        print(f"  {label}: plan: {describe(r)}; peak RSS {r['rss_gb']:.2f} GB, wall {r['seconds']:.0f} s")
    print(
        f"  peak under the budget: {tight['rss_gb'] <= f32 / 2e9}; tensors identical to the unconstrained run: {same}"
    )


def threaded(threads: int, src: Path, out: Path, method: str, extra: list[str] = ()) -> dict:
    """`compress` with OMP_NUM_THREADS=threads in every process it starts."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        return compress(src, out, method, list(extra))
    finally:
        os.environ.pop("OMP_NUM_THREADS") if before is None else os.environ.update(OMP_NUM_THREADS=before)


def ranks(work: Path) -> None:
    """Expert-parallel ranks (gloo, this machine's 2 cores): 2 ranks x 1 thread against 1 rank x 2 threads and 1 rank x
    1 thread (the same BLAS summation order as each rank: equal sha256 expected there), GPTQ w4 of an 8-layer model;
    and each rank's peak RSS against one rank's on the many-expert layer, RTN w4, whole."""
    setups = {"1 rank x 2 threads": (2, []), "1 rank x 1 thread": (1, []), "2 ranks x 1 thread": (1, ["--ranks", "2"])}
    for name, method in (("eight-layers", "gptq"), ("many-experts-layer", "rtn")):
        src = source(work, name)
        layers, experts, hidden, inter, _ = SOURCES[name]
        outs = {label: work / f"{name}-{i}" for i, label in enumerate(setups)}
        runs = {label: threaded(threads, src, outs[label], method, extra) for label, (threads, extra) in setups.items()}
        two = tensor_hashes(outs["2 ranks x 1 thread"])
        print(f"\n{name} ({layers} x {experts} x ({hidden} x {inter})), {method.upper()} w4, 2 gloo ranks")
        for label, r in runs.items():
            peaks = ", ".join(f"{p / 1e3:.2f}" for p in r.get("rank_peak_rss_mb") or [r["rss_gb"] * 1e3])
            print(
                f"  {label}: wall {r['seconds']:.0f} s (quantize stage {r['stage_seconds']['quantize']:.0f} s), "
                f"peak RSS per rank {peaks} GB; tensors equal to 2 ranks': {tensor_hashes(outs[label]) == two}"
            )
        one, two_ranks = runs["1 rank x 2 threads"], runs["2 ranks x 1 thread"]
        print(
            f"  2 ranks x 1 thread / 1 rank x 2 threads: wall {two_ranks['seconds'] / one['seconds']:.2f}x, quantize "
            f"stage {two_ranks['stage_seconds']['quantize'] / one['stage_seconds']['quantize']:.2f}x"
        )


def projection(rest_per_expert: float | None) -> None:
    """Whole-model GPTQ w4 time from one expert's GPTQ at the DeepSeek-V3 shape (and Kimi-K2's: the same shape)."""
    torch.manual_seed(0)
    inter, hidden = 2048, 7168
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    h_in, h_mid, w4 = hessian(hidden), hessian(inter), IntFormat(4, 128)
    seconds = best(
        lambda: (gptq.quantize_gptq_shared([gate, up], h_in, [w4, w4]), gptq.quantize_gptq(down, h_mid, w4)), 1
    )
    a = torch.randn(4096, 4096)
    gflops = 2 * 4096**3 / best(lambda: a @ a, 3) / 1e9
    rest = rest_per_expert or 0.0
    print(
        f"\nprojection: GPTQ w4 of one {inter} x {hidden} expert {seconds:.1f} s here ({torch.get_num_threads()} threads, "
        f"float32 matmul {gflops:.0f} GFLOP/s); reading, observing and writing it {rest:.2f} s (chunked RTN run above)"
    )
    print("  assumptions: experts split evenly over N ranks, each as fast as this machine; the attention and the")
    print("  calibration forward not counted; a GPU rank as fast as its float32 peak (H100 SXM: 67 TFLOP/s) over")
    print(f"  this CPU's {gflops:.0f} GFLOP/s on the GPTQ part, the rest unchanged")
    gpu = 67e3 / gflops
    for name, (layers, experts, _, _) in FULL.items():
        per = layers * experts
        cpu_h = per * (seconds + rest) / 3600
        gpu_h = per * (seconds / gpu + rest) / 3600
        print(
            f"  {name}: {per} experts; 1 worker like this one {cpu_h:.0f} h, 8 such workers {cpu_h / 8:.1f} h; "
            f"8 GPUs under these assumptions {gpu_h / 8:.2f} h"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/moecompress-frontier"))
    parser.add_argument("--budget", default="6GB", help="--max-memory of the DeepSeek-V3-shaped run")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["deepseek", "chunking", "gptq", "ranks", "projection"]
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rest = None if "deepseek" in args.skip else deepseek(args.work, args.budget)
    if "chunking" not in args.skip:
        chunking(args.work)
    if "gptq" not in args.skip:
        gptq_budget(args.work)
    if "ranks" not in args.skip:
        ranks(args.work)
    if "projection" not in args.skip:
        projection(rest)
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
