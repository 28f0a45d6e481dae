"""One Qwen3-30B-A3B-shaped MoE layer (128 experts, top-8, H=2048, I=768) on this CPU: dense fp32 / bf16 expert
loops (F.linear per active expert, as transformers' eager path), the torch reference packed path, and the
native kernels for every stored format, at batch 1, 4, 16 and prefill 512. Prints ms per layer call, the bytes
of expert weights read per ms (GB/s), their fraction of this machine's measured memory bandwidth (the best of a
STREAM triad and a read-only dot product over buffers far above the L3 size, measured before and after each batch
size's rows, which are compared with the higher of the two: other tenants of a shared machine move it by up to 2x
within a minute; the summary also gives the fraction of the run's highest) and the speed-up over the faster dense
path. At 1 token, w4 runs once more with the same experts every call (weights in L3): the kernel's speed where
memory is not the limit. Then the model's unquantized linear layers (the attention projections of 8 Qwen3-30B-A3B layers: q 4096x2048,
k and v 512x2048, o 2048x4096, 604 MB as float32) at 1, 4 and 16 tokens: torch `F.linear` against the native dense
GEMV (`runtime/native_linear.py`), float32 and bfloat16 weights.

    python eval/bench_cpu_kernels.py [--batches 1 4 16 512] [--repeats 20] [--dense-only]

Weights are random codes (speed does not depend on their values); routing is drawn fresh for every call, so
the active experts' weights come from memory, not cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moecompress.formats import IntFormat, QuantFormat, ternary_format
from moecompress.runtime import native
from moecompress.runtime.packed_experts import PackedExperts

E, H, INTER, TOP_K = 128, 2048, 768, 8
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def stream_bandwidth(mbytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s of a STREAM triad a = b + s * c (2 reads + 1 write per element) and of a read-only dot product
    over float32 buffers of `mbytes` each, far above the L3 size; best of `repeats`."""
    n = mbytes * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return {
        "triad": 3 * n * 4 / best(lambda: torch.add(b, c, alpha=3.0, out=a)) / 1e9,
        "read": 2 * n * 4 / best(lambda: torch.dot(b, c)) / 1e9,
    }


def fill(linear, g: torch.Generator):
    """Random codes, scales and zeros into a `PackedLinear` (speed does not depend on the values)."""
    packed = linear.weight_packed
    if packed.dtype == torch.int32:
        packed.copy_(torch.randint(-(2**31), 2**31 - 1, packed.shape, generator=g, dtype=torch.int64).to(torch.int32))
    else:
        packed.copy_(torch.randint(0, 243, packed.shape, generator=g).to(torch.uint8))
    linear.weight_scale.copy_((torch.rand(linear.weight_scale.shape, generator=g) * 0.01 + 1e-3).half())
    if hasattr(linear, "weight_zero_point"):
        linear.weight_zero_point.copy_(
            torch.randint(0, 2**linear.fmt.bits, linear.weight_zero_point.shape, generator=g).to(torch.uint8)
        )
    return linear


def packed_layer(
    formats: list[QuantFormat], experts: int = E, hidden: int = H, inter: int = INTER, g: torch.Generator | None = None
) -> PackedExperts:
    """Experts e with format formats[e % len(formats)], filled with random codes, scales and zeros."""
    module = PackedExperts(
        hidden, inter, [dict.fromkeys(PROJECTIONS, formats[e % len(formats)]) for e in range(experts)], torch.nn.SiLU()
    )
    g = g if g is not None else torch.Generator().manual_seed(0)
    for linear in (getattr(expert, p) for expert in module for p in PROJECTIONS):
        fill(linear, g)
    return module


def expert_bytes(module: PackedExperts, e: int) -> int:
    return sum(b.numel() * b.element_size() for p in PROJECTIONS for b in getattr(module[e], p).buffers())


def dense_forward(weights: list[torch.Tensor], x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """transformers-style eager loop: per active expert, gate/up/down with F.linear in the weights' dtype."""
    gate_up, down = weights
    out = torch.zeros_like(x)
    xw = x.to(gate_up.dtype)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        gate, up = F.linear(xw[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e])
        out.index_add_(0, tok, (y.float() * w[tok, slot, None]))
    return out


def routing(tokens: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(tokens)])
    return ids, torch.rand(tokens, TOP_K, generator=g).softmax(-1)


def timed(fn, tokens: int, repeats: int, hot: bool = False) -> tuple[float, float]:
    """(median seconds per call, mean distinct experts per call), fresh routing every call, or with `hot` the same
    experts every call (their weights then stay in cache: what the kernel does when memory is not the limit)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, H, generator=g)
    first = routing(tokens, g)
    fn(x, *first)  # warm-up (kernel build, first-touch)
    times, active = [], []
    for _ in range(repeats):
        ids, w = first if hot else routing(tokens, g)
        start = time.perf_counter()
        fn(x, ids, w)
        times.append(time.perf_counter() - start)
        active.append(len(ids.unique()))
    return statistics.median(times), sum(active) / len(active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 512])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dense-only", action="store_true", help="only the unquantized linear layers")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    measured = stream_bandwidth()
    print(
        f"machine: {torch.get_num_threads()} threads, memory bandwidth: triad {measured['triad']:.1f} GB/s, "
        f"read {measured['read']:.1f} GB/s; kernels: {native.kernel_name()}"
    )
    bandwidth = max(measured.values())
    if args.dense_only:
        return bench_dense_linears(bandwidth, args.repeats)
    dense = {}
    for dtype in (torch.float32, torch.bfloat16):
        dense[dtype] = [
            torch.randn(E, 2 * INTER, H).mul_(0.02).to(dtype),
            torch.randn(E, H, INTER).mul_(0.02).to(dtype),
        ]
    layers = {
        "w8 g128": [IntFormat(8, 128)],
        "w4 g128": [IntFormat(4, 128)],
        "w3 g128": [IntFormat(3, 128)],
        "w2 g128": [IntFormat(2, 128)],
        "ternary 2-bit g128": [ternary_format(128, "bits")],
        "ternary base-3 g128": [ternary_format(128, "base3")],
        "mixed 2/3/4 (LP-like)": [IntFormat(2, 128), IntFormat(3, 128), IntFormat(4, 128), IntFormat(3, 128)],
    }
    print("| path | tokens | ms | GB/s | % of bandwidth | x faster dense |")
    print("|---|---|---|---|---|---|")
    results, before, seen = {}, bandwidth, [bandwidth]
    for tokens in args.batches:
        repeats = max(3, args.repeats // (4 if tokens > 16 else 1))
        rows, timed_results = bench_batch(tokens, repeats, dense, layers)
        after = max(stream_bandwidth().values())
        around = max(before, after)  # the machine's bandwidth while these rows ran (the higher of both sides)
        seen.append(after)
        print(f"| (bandwidth around the {tokens}-token rows: {before:.1f} before, {after:.1f} after) | | | | | |")
        for label, ms, gbs, speedup in rows:
            print(f"| {label} | {tokens} | {ms:.2f} | {gbs:.1f} | {100 * gbs / around:.0f} | {speedup} |")
        for key, (speedup, over_fp32, gbs) in timed_results.items():
            results[key] = (speedup, over_fp32, gbs, around)
        before = after
    print(f"memory bandwidth: {min(seen):.1f} to {max(seen):.1f} GB/s over the run (other tenants move it)")
    summarize(results, max(seen))
    bench_dense_linears(before, args.repeats)


def bench_dense_linears(bandwidth: float, repeats: int) -> None:
    """The unquantized linear layers of a decode step: torch `F.linear` and the native dense GEMV over weights far
    above the L3 size, read in turn (as a decode step reads them)."""
    shapes = [(4096, H), (512, H), (512, H), (H, 4096)] * 8
    g = torch.Generator().manual_seed(2)
    weights = {torch.float32: [torch.randn(*s, generator=g) for s in shapes]}
    weights[torch.bfloat16] = [w.bfloat16() for w in weights[torch.float32]]
    paths = {
        "torch F.linear": lambda w, x: F.linear(x.to(w.dtype), w),
        "native dense GEMV": lambda w, x: native.dense_linear(w, None, x),
    }
    print("| dense linear layers | weights | tokens | ms | GB/s | % of bandwidth | x faster torch fp32 |")
    print("|---|---|---|---|---|---|---|")
    for tokens in (1, 4, 16):
        x = torch.randn(tokens, H, generator=g)
        baseline = None
        for (name, fn), dtype in ((p, d) for p in paths.items() for d in weights):
            ws = weights[dtype]
            for w in ws:  # warm-up
                fn(w, x[:, : w.shape[1]] if w.shape[1] == H else torch.randn(tokens, w.shape[1]))
            inputs = [torch.randn(tokens, w.shape[1], generator=g) for w in ws]
            times = []
            for _ in range(max(3, repeats // 4)):
                start = time.perf_counter()
                for w, xi in zip(ws, inputs):
                    fn(w, xi)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            baseline = baseline or seconds
            gbs = sum(w.numel() * w.element_size() for w in ws) / seconds / 1e9
            print(
                f"| {name} | {str(dtype).replace('torch.', '')} | {tokens} | {seconds * 1e3:.2f} | {gbs:.1f} | "
                f"{100 * gbs / bandwidth:.0f} | {baseline / seconds:.2f} |"
            )


def bench_batch(tokens: int, repeats: int, dense: dict, layers: dict) -> tuple[list, dict]:
    """The rows of one batch size, (path, ms, GB/s, x faster dense), and per native row
    {(label, tokens): (x faster dense, x faster dense fp32, GB/s)}."""
    ms, rows, results = {}, [], {}
    for dtype, name in ((torch.float32, "dense fp32"), (torch.bfloat16, "dense bf16")):
        seconds, active = timed(lambda x, i, w, d=dtype: dense_forward(dense[d], x, i, w), tokens, repeats)
        ms[name] = seconds * 1e3
        rows.append((name, ms[name], active * 3 * H * INTER * dense[dtype][0].element_size() / seconds / 1e9, ""))
    best_dense = min(ms.values())
    for label, formats in layers.items():
        module = packed_layer(formats)
        per_expert = sum(expert_bytes(module, e) for e in range(E)) / E
        for path in ("torch reference", "native") if label == "w4 g128" else ("native",):
            if path == "torch reference":
                with _torch_path():
                    seconds, active = timed(module, tokens, max(3, repeats // 4))
            else:
                seconds, active = timed(module, tokens, repeats)
            used = "native" if path == "native" and module.native_usable(torch.zeros(tokens, H)) else "torch"
            gbs = active * per_expert / seconds / 1e9
            speedup = best_dense / (seconds * 1e3)
            rows.append((f"{label} ({used})", seconds * 1e3, gbs, f"{speedup:.2f}"))
            if used == "native":
                results[label, tokens] = (speedup, ms["dense fp32"] / (seconds * 1e3), gbs)
        if label == "w4 g128" and tokens == 1:  # the kernel's own speed, weights in L3: its bound where memory is not
            seconds, active = timed(module, tokens, repeats, hot=True)
            rows.append(
                (f"{label} (native, same experts every call)", seconds * 1e3, active * per_expert / seconds / 1e9, "")
            )
        del module
    return rows, results


def summarize(results: dict, highest: float) -> None:
    """The issue's targets, from the measured rows {(label, tokens): (x dense, x dense fp32, GB/s, bandwidth around
    it)}: bandwidth fractions of the bandwidth measured around the rows, and (conservative) of the run's `highest`."""
    one = {label: r for (label, tokens), r in results.items() if tokens == 1}
    if one:
        speedup, _, gbs, around = one["w4 g128"]
        print(
            f"batch 1: w4 {speedup:.2f}x the faster dense path (target >= 3) at {100 * gbs / around:.0f} % of the "
            f"bandwidth around it (>= 50; {100 * gbs / highest:.0f} % of the run's highest, {highest:.1f} GB/s); "
            f"w2 {one['w2 g128'][0]:.2f}x, ternary "
            f"{one['ternary 2-bit g128'][0]:.2f}x / {one['ternary base-3 g128'][0]:.2f}x (>= 4.5); "
            f"w8 {one['w8 g128'][0]:.2f}x (>= 1.7)"
        )
    big = [r[1] for (label, tokens), r in results.items() if tokens >= 16]
    if big:
        print(f"16 tokens and more: the slowest native row is {min(big):.2f}x the dense fp32 loop (target >= 1)")


class _torch_path:
    """Run PackedExperts on the torch reference path for the duration."""

    def __enter__(self):
        self.saved, native.MAX_TOKENS = native.MAX_TOKENS, -1

    def __exit__(self, *exc):
        native.MAX_TOKENS = self.saved


if __name__ == "__main__":
    main()
