"""GPTQ of one routed expert on this CPU, at the expert shapes of real MoEs: gate, up and down in w4g128 on Hessians
from 4096 random correlated tokens. Prints seconds per expert for one call per matrix, for gate and up in one
pass (`quantize_gptq_shared`: they share their inputs), for small experts many in one batched pass
(`quantize_gptq_batched`, as many as `gptq_experts_at_once` gives), the four widths of the factored stage's error
estimates in one pass, and what the experts of the whole model would take at that rate (layers x experts).

    python eval/bench_gptq.py [--shapes tiny qwen3-30b] [--baseline OLD_gptq.py] [--at-once N]

`--baseline` times another version of `moecompress/quant/gptq.py` side by side, one call per matrix (e.g.
`git show 122d912:moecompress/quant/gptq.py > /tmp/gptq_old.py`, the column loop before this file existed).
"""

from __future__ import annotations

import argparse
import importlib.util
import timeit

import torch

from moecompress.calibration.budget import gptq_experts_at_once
from moecompress.formats import IntFormat
from moecompress.quant import gptq

# name: (intermediate, hidden, MoE layers, routed experts)
SHAPES = {
    "tiny": (256, 256, 4, 16),  # ../shared/models/moe-tiny-text
    "qwen3-30b": (768, 2048, 48, 128),  # Qwen3-30B-A3B, Qwen3-VL-30B-A3B
    "deepseek-v3": (2048, 7168, 58, 256),
}


def hessian(n: int, tokens: int = 4096) -> torch.Tensor:
    x = torch.randn(tokens, n) @ (torch.randn(n, n) / n**0.5 + torch.eye(n))
    return x.T @ x


def best(fn, repeats: int) -> float:
    """Least seconds of `repeats` calls, after one to warm up."""
    return min(timeit.repeat(fn, number=1, repeat=repeats + 1)[1:])


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("moecompress.quant.gptq_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_shape(name: str, baseline, repeats: int, at_once: int | None = None) -> None:
    """Print the rows of one expert shape."""
    inter, hidden, layers, experts = SHAPES[name]
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    h_in, h_mid = hessian(hidden), hessian(inter)
    w4 = IntFormat(4, 128)

    def per_matrix(module):
        return [module.quantize_gptq(w, h, w4) for w, h in ((gate, h_in), (up, h_in), (down, h_mid))]

    def shared():
        return gptq.quantize_gptq_shared([gate, up], h_in, [w4, w4]), gptq.quantize_gptq(down, h_mid, w4)

    def batched():  # the experts one batched GPTQ takes at this shape, per expert
        gptq.quantize_gptq_batched([([gate, up], h_in)] * at_once, [w4, w4])
        gptq.quantize_gptq_batched([([down], h_mid)] * at_once, [w4])

    at_once = at_once or gptq_experts_at_once(max(inter, hidden))
    variants = {"one call per matrix": lambda: per_matrix(gptq), "gate and up in one pass": shared}
    if at_once > 1:
        variants[f"{at_once} experts in one batched pass"] = batched
    if baseline is not None:
        variants = {"baseline, one call per matrix": lambda: per_matrix(baseline), **variants}
    times = {
        label: best(fn, repeats) / (at_once if label.endswith("batched pass") else 1) for label, fn in variants.items()
    }
    first = next(iter(times.values()))
    for label, seconds in times.items():
        hours = seconds * layers * experts / 3600
        print(f"| {name} ({inter} x {hidden}) | {label} | {seconds:.3f} ({first / seconds:.2f}x) | {hours:.2f} h |")
    widths = [IntFormat(b, 128) for b in (2, 3, 4, 8)]
    seconds = best(lambda: gptq.quantize_gptq_shared([gate] * 4, h_in, widths), repeats)
    print(f"| {name} ({inter} x {hidden}) | gate alone, in 2, 3, 4 and 8 bits in one pass | {seconds:.3f} | |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["tiny", "qwen3-30b"], choices=sorted(SHAPES))
    parser.add_argument("--baseline", help="another gptq.py to time side by side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--at-once", type=int, help="experts per batched pass (default: gptq_experts_at_once)")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| shape (I x H) | variant | s per expert (speed-up over the first row) | the whole model's experts |")
    print("|---|---|---|---|")
    for name in args.shapes:
        bench_shape(name, baseline, args.repeats, args.at_once)


if __name__ == "__main__":
    main()
