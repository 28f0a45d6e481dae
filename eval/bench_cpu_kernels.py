"""One Qwen3-30B-A3B-shaped MoE layer (128 experts, top-8, H=2048, I=768) on this CPU: dense fp32 / bf16 expert
loops (F.linear per active expert, as transformers' eager path), the torch reference packed path, and the
native kernels for every stored format, at batch 1, 4, 16 and prefill 512. Prints ms per layer call, the bytes
of expert weights read per ms (GB/s), their fraction of this machine's measured memory bandwidth (a STREAM-like
triad over buffers far above the L3 size, in the same run) and the speed-up over the faster dense path.

    python eval/bench_cpu_kernels.py [--batches 1 4 16 512] [--repeats 20]

Weights are random codes (speed does not depend on their values); routing is drawn fresh for every call, so
the active experts' weights come from memory, not cache.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moecompress.quant.qtensor import QuantFormat
from moecompress.runtime import native
from moecompress.runtime.packed_experts import PackedExperts

E, H, INTER, TOP_K = 128, 2048, 768, 8
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def triad_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """GB/s of a = b + s * c over three float32 buffers of `mbytes` each (2 reads + 1 write per element)."""
    n = mbytes * (1 << 20) // 4
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - start)
    return 3 * n * 4 / best / 1e9


def packed_layer(formats: list[QuantFormat]) -> PackedExperts:
    """Experts e with format formats[e % len(formats)], filled with random codes, scales and zeros."""
    module = PackedExperts(
        H, INTER, [dict.fromkeys(PROJECTIONS, formats[e % len(formats)]) for e in range(E)], torch.nn.SiLU()
    )
    g = torch.Generator().manual_seed(0)
    for linear in (getattr(expert, p) for expert in module for p in PROJECTIONS):
        packed = linear.weight_packed
        if packed.dtype == torch.int32:
            packed.copy_(
                torch.randint(-(2**31), 2**31 - 1, packed.shape, generator=g, dtype=torch.int64).to(torch.int32)
            )
        else:
            packed.copy_(torch.randint(0, 243, packed.shape, generator=g).to(torch.uint8))
        linear.weight_scale.copy_((torch.rand(linear.weight_scale.shape, generator=g) * 0.01 + 1e-3).half())
        if linear.weight_zero_point is not None:
            linear.weight_zero_point.copy_(
                torch.randint(0, 2**linear.fmt.bits, linear.weight_zero_point.shape, generator=g).to(torch.uint8)
            )
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


def timed(fn, tokens: int, repeats: int) -> tuple[float, float]:
    """(median seconds per call, mean distinct experts per call), fresh routing every call."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, H, generator=g)
    fn(x, *routing(tokens, g))  # warm-up (kernel build, first-touch)
    times, active = [], []
    for _ in range(repeats):
        ids, w = routing(tokens, g)
        start = time.perf_counter()
        fn(x, ids, w)
        times.append(time.perf_counter() - start)
        active.append(len(ids.unique()))
    return statistics.median(times), sum(active) / len(active)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 512])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    bandwidth = triad_bandwidth()
    print(
        f"machine: {torch.get_num_threads()} threads, triad memory bandwidth {bandwidth:.1f} GB/s; "
        f"kernels: {native.kernel_name()}"
    )
    dense = {}
    for dtype in (torch.float32, torch.bfloat16):
        dense[dtype] = [
            torch.randn(E, 2 * INTER, H).mul_(0.02).to(dtype),
            torch.randn(E, H, INTER).mul_(0.02).to(dtype),
        ]
    layers = {
        "w8 g128": [QuantFormat(8, 128)],
        "w4 g128": [QuantFormat(4, 128)],
        "w3 g128": [QuantFormat(3, 128)],
        "w2 g128": [QuantFormat(2, 128)],
        "ternary 2-bit g128": [QuantFormat.make_ternary(128, "bits")],
        "ternary base-3 g128": [QuantFormat.make_ternary(128, "base3")],
        "mixed 2/3/4 (LP-like)": [QuantFormat(2, 128), QuantFormat(3, 128), QuantFormat(4, 128), QuantFormat(3, 128)],
    }
    print("| path | tokens | ms | GB/s | % of bandwidth | x faster dense |")
    print("|---|---|---|---|---|---|")
    for tokens in args.batches:
        repeats = max(3, args.repeats // (4 if tokens > 16 else 1))
        ms = {}
        for dtype, name in ((torch.float32, "dense fp32"), (torch.bfloat16, "dense bf16")):
            seconds, active = timed(lambda x, i, w, d=dtype: dense_forward(dense[d], x, i, w), tokens, repeats)
            ms[name] = seconds * 1e3
            gbs = active * 3 * H * INTER * dense[dtype][0].element_size() / seconds / 1e9
            print(f"| {name} | {tokens} | {ms[name]:.2f} | {gbs:.1f} | {100 * gbs / bandwidth:.0f} | |")
        best_dense = min(ms.values())
        for label, formats in layers.items():
            module = packed_layer(formats)
            per_expert = sum(expert_bytes(module, e) for e in range(E)) / E
            paths = [("native", module)]
            if label == "w4 g128":
                paths.insert(0, ("torch reference", module))
            for path, m in paths:
                if path == "torch reference":
                    with _torch_path():
                        seconds, active = timed(m, tokens, max(3, repeats // 4))
                else:
                    seconds, active = timed(m, tokens, repeats)
                used = "native" if path == "native" and m.native_usable(torch.zeros(tokens, H)) else "torch"
                gbs = active * per_expert / seconds / 1e9
                print(
                    f"| {label} ({used}) | {tokens} | {seconds * 1e3:.2f} | {gbs:.1f} | {100 * gbs / bandwidth:.0f} | "
                    f"{best_dense / (seconds * 1e3):.2f} |"
                )
            del module


class _torch_path:
    """Run PackedExperts on the torch reference path for the duration."""

    def __enter__(self):
        self.saved, native.MAX_TOKENS = native.MAX_TOKENS, -1

    def __exit__(self, *exc):
        native.MAX_TOKENS = self.saved


if __name__ == "__main__":
    main()
