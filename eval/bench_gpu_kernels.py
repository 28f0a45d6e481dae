"""GPU kernels for packed experts on one CUDA device, in one run: builds the CUDA library, runs the `gpu` tests,
then times (CUDA graphs; weights rotated through more than 4x the L2 size) cuBLAS bf16, torch's
dequantize + matmul, torch's int4 kernel where it exists, and ours (CUDA decode kernels up to 8 tokens, the Triton
grouped GEMM above): GEMV/GEMM on 8192x8192 and 14336x4096 at batch 1/4/16/64, and one Qwen3-30B-A3B-shaped MoE
layer (128 experts, top-8, H=2048, I=768) at batch 1/16/64. Prints ms, GB/s of weights read, the fraction of the
measured bf16 read bandwidth and the ratios the issue's targets are stated in. Sized for under 5 minutes on an
H100/H200.

    python eval/bench_gpu_kernels.py
    python eval/bench_gpu_kernels.py --smoke    # tiny shapes on CPU (Triton interpreter): checks this script
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

from bench_cpu_kernels import fill, packed_layer  # noqa: E402

from moecompress.formats import IntFormat, ternary_format  # noqa: E402
from moecompress.runtime import cuda_kernels  # noqa: E402
from moecompress.runtime.packed_experts import ExpertList, PackedLinear  # noqa: E402

FORMATS = {
    "w8 g128": [IntFormat(8, 128)],
    "w4 g128": [IntFormat(4, 128)],
    "w3 g128": [IntFormat(3, 128)],
    "w2 g128": [IntFormat(2, 128)],
    "ternary g128": [ternary_format(128, "bits")],
    "mixed 2/3/4": [IntFormat(2, 128), IntFormat(3, 128), IntFormat(4, 128), IntFormat(3, 128)],
}


def nbytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def timed(calls: list, device: torch.device, repeats: int, graph: bool = True) -> tuple[float, str]:
    """Seconds per call of the callables `calls` (run in turn, each on its own weights), and how: one CUDA graph
    of all of them replayed, or plain calls (on CPU, and for `graph=False`: code that reads results back)."""
    for fn in calls:
        fn()  # warm-up: kernel builds, Triton autotuning, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                for fn in calls:
                    fn()
            cuda_graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                cuda_graph.replay()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / repeats / len(calls), "graph"
        start = time.perf_counter()
        for _ in range(repeats):
            for fn in calls:
                fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats / len(calls), "eager"
    start = time.perf_counter()
    for _ in range(max(1, repeats // 10)):
        for fn in calls:
            fn()
    return (time.perf_counter() - start) / max(1, repeats // 10) / len(calls), "eager"


def read_bandwidth(device: torch.device, gbytes: float) -> float:
    """GB/s of summing a bf16 buffer of `gbytes` (reads only)."""
    x = torch.ones(int(gbytes * 1e9) // 2, dtype=torch.bfloat16, device=device)
    seconds, _ = timed([lambda: x.sum()], device, 10)
    return x.numel() * 2 / seconds / 1e9


def copies_for(bytes_each: int, l2_bytes: int) -> int:
    """Weight copies to rotate through so that each call reads from memory, not L2."""
    return max(2, math.ceil(4 * l2_bytes / max(bytes_each, 1)))


def ours_linear(linear: PackedLinear, x: torch.Tensor):
    """Our kernel for one packed matrix: CUDA decode up to 8 tokens, the Triton GEMM above."""
    from moecompress.runtime import triton_moe

    table = triton_moe.ProjectionTable.build([linear])
    tokens = x.shape[0]
    lib = cuda_kernels.library() if x.device.type == "cuda" else None
    if lib is not None and tokens <= cuda_kernels.DECODE_TOKENS:
        desc = cuda_kernels.GpuExperts._desc(table, 0)
        import ctypes

        descs = torch.frombuffer(bytearray(desc), dtype=torch.uint8).to(x.device)
        xf = x.float().contiguous()
        zeros = torch.zeros(tokens, dtype=torch.int64, device=x.device)
        ones = torch.ones(tokens, dtype=torch.float32, device=x.device)
        y = torch.empty(tokens, linear.out_features, device=x.device)
        stream = torch.cuda.current_stream(x.device).cuda_stream

        def run():
            lib.moe_cuda_linear(
                descs.data_ptr(), xf.data_ptr(), zeros.data_ptr(), ones.data_ptr(), tokens,
                linear.out_features, linear.in_features, y.data_ptr(), ctypes.c_void_p(stream),
            )  # fmt: skip

        return run, "cuda decode"
    pairs, block_expert = triton_moe.align(torch.zeros(tokens, 1, dtype=torch.int64, device=x.device), 1, 16)
    return lambda: triton_moe.grouped_gemm(x, table, pairs, block_expert, tokens, 1), "triton"


def torch_int4(weight: torch.Tensor, x: torch.Tensor):
    """torch's int4 kernel (tinygemm) on the same shape, or None with the reason."""
    try:
        n, k = weight.shape
        q = torch.randint(0, 16, (n, k // 2), dtype=torch.uint8, device=weight.device)
        packed = torch.ops.aten._convert_weight_to_int4pack(q, 8)
        sz = torch.rand(k // 128, n, 2, dtype=torch.bfloat16, device=weight.device)
        xb = x.to(torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz)
        return lambda: torch.ops.aten._weight_int4pack_mm(xb, packed, 128, sz), nbytes_int4(n, k)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return None, str(exc).splitlines()[0][:80]


def nbytes_int4(n: int, k: int) -> int:
    return n * k // 2 + n * (k // 128) * 4


def bench_matrices(args, device, bandwidth, l2) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    labels = ("w4 g128", "w2 g128", "ternary g128", "w8 g128", "w3 g128")
    for out_f, in_f in args.shapes:
        dense = [torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02]
        dense += [dense[0].clone() for _ in range(copies_for(out_f * in_f * 2, l2) - 1)]
        mats = {}
        for label in labels:
            first = fill(PackedLinear(out_f, in_f, FORMATS[label][0]), g)
            count = copies_for(nbytes(first), l2)
            mats[label] = [first.to(device)] + [
                fill(PackedLinear(out_f, in_f, FORMATS[label][0]), g).to(device) for _ in range(count - 1)
            ]
        for tokens in args.batches:
            x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
            bf16, how = timed([lambda w=w, x=x: F.linear(x, w) for w in dense], device, args.repeats)
            rows.append(row("cuBLAS bf16", (out_f, in_f), tokens, "bf16", bf16, out_f * in_f * 2, bandwidth, bf16, how))
            fn, detail = torch_int4(dense[0], x)
            if fn is None:
                print(f"torch int4 kernel: n/a ({detail})")
            else:
                s, how = timed([fn], device, args.repeats)
                rows.append(
                    row("torch int4 (tinygemm)", (out_f, in_f), tokens, "w4 g128", s, detail, bandwidth, bf16, how)
                )
            for label in labels:
                size = nbytes(mats[label][0])
                if label == "w4 g128":
                    s, how = timed(
                        [lambda m=mats[label][0], x=x: m(x)], device, max(2, args.repeats // 10), graph=False
                    )
                    rows.append(
                        row("torch dequant+matmul", (out_f, in_f), tokens, label, s, size, bandwidth, bf16, how)
                    )
                calls = [ours_linear(m, x) for m in mats[label]]
                s, how = timed([c for c, _ in calls], device, args.repeats)
                rows.append(row(f"ours ({calls[0][1]})", (out_f, in_f), tokens, label, s, size, bandwidth, bf16, how))
                del calls
    return rows


def bench_moe(args, device, bandwidth, l2) -> list[dict]:
    from moecompress.runtime import native

    experts, hidden, inter, top_k = args.moe
    rows = []
    g = torch.Generator().manual_seed(1)
    dense = [torch.randn(experts, 2 * inter, hidden, device=device, dtype=torch.bfloat16) * 0.02,
             torch.randn(experts, hidden, inter, device=device, dtype=torch.bfloat16) * 0.02]  # fmt: skip
    modules = {label: packed_layer(formats, experts, hidden, inter, g).to(device) for label, formats in FORMATS.items()}
    path = cuda_kernels.kernel_name() if device.type == "cuda" else native.kernel_name()
    for tokens in args.moe_batches:
        x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        routings = [
            (torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).to(device),
             torch.rand(tokens, top_k, generator=g).softmax(-1).to(device))
            for _ in range(args.routings)
        ]  # fmt: skip
        active = sum(len(ids.unique()) for ids, _ in routings) / len(routings)
        calls = [lambda i=i, w=w, x=x: dense_moe(dense, x, i, w) for i, w in routings]
        bf16, how = timed(calls, device, max(2, args.repeats // 5), graph=False)
        rows.append(
            row("bf16 expert loop", "moe", tokens, "bf16", bf16, active * 3 * hidden * inter * 2, bandwidth, bf16, how)
        )
        for label, module in modules.items():
            per_expert = nbytes(module) / experts
            if label == "w4 g128":
                calls = [lambda i=i, w=w, m=module, x=x: ExpertList.forward(m, x, i, w) for i, w in routings[:2]]
                loop, how = timed(calls, device, max(2, args.repeats // 10), graph=False)
                rows.append(
                    row(
                        "torch dequant+matmul loop",
                        "moe",
                        tokens,
                        label,
                        loop,
                        active * per_expert,
                        bandwidth,
                        bf16,
                        how,
                    )
                )
            s, how = timed([lambda i=i, w=w, m=module, x=x: m(x, i, w) for i, w in routings], device, args.repeats)
            rows.append(row(f"ours ({path})", "moe", tokens, label, s, active * per_expert, bandwidth, bf16, how))
            if label == "w4 g128":
                rows[-1]["x loop"] = loop / s
    return rows


def dense_moe(weights, x, ids, w):
    gate_up, down = weights
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in ids.unique().tolist():  # transformers' eager loop over the active experts
        tok, slot = torch.where(ids == e)
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        out.index_add_(0, tok, F.linear(F.silu(gate) * up, down[e]).float() * w[tok, slot, None])
    return out


def row(kernel, shape, tokens, fmt, seconds, weight_bytes, bandwidth, bf16_seconds, how) -> dict:
    gbs = weight_bytes / seconds / 1e9
    return dict(kernel=kernel, shape=shape, tokens=tokens, format=fmt, ms=seconds * 1e3, gbs=gbs,
                frac=100 * gbs / bandwidth, x_bf16=bf16_seconds / seconds, how=how)  # fmt: skip


def print_rows(rows: list[dict]) -> None:
    print("| kernel | shape | tokens | format | ms | GB/s | % of bf16 read bw | x bf16 | x loop | timing |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if isinstance(r["shape"], tuple) else r["shape"]
        loop = f"{r['x loop']:.1f}" if "x loop" in r else ""
        print(
            f"| {r['kernel']} | {shape} | {r['tokens']} | {r['format']} | {r['ms']:.4f} | {r['gbs']:.0f} | "
            f"{r['frac']:.0f} | {r['x_bf16']:.2f} | {loop} | {r['how']} |"
        )


def summarize(rows: list[dict]) -> None:
    def pick(fmt, tokens, shape=None):
        return [r for r in rows if r["kernel"].startswith("ours") and r["format"] == fmt and r["tokens"] == tokens
                and (shape is None or r["shape"] == shape)]  # fmt: skip

    big = [r["shape"] for r in rows if isinstance(r["shape"], tuple)]
    for shape in dict.fromkeys(big):
        w4 = pick("w4 g128", 1, shape)
        if w4:
            print(
                f"{shape[0]}x{shape[1]}, 1 token: w4 {w4[0]['x_bf16']:.2f}x bf16 (target >= 3) at {w4[0]['frac']:.0f} % "
                f"of bandwidth (>= 70); w2 {pick('w2 g128', 1, shape)[0]['x_bf16']:.2f}x, ternary "
                f"{pick('ternary g128', 1, shape)[0]['x_bf16']:.2f}x (>= 5)"
            )
    slow16 = [r for r in rows if r["kernel"].startswith("ours") and r["tokens"] == 16 and r["x_bf16"] < 1]
    print(f"16 tokens, rows slower than bf16: {len(slow16)} (target 0) {[(r['shape'], r['format']) for r in slow16]}")
    loop = [r for r in rows if "x loop" in r and r["tokens"] == 1]
    if loop:
        print(f"MoE layer, 1 token: grouped w4 {loop[0]['x loop']:.1f}x the dequant+matmul loop (target >= 5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.smoke:
        device, l2, args.repeats = torch.device("cpu"), 1 << 10, 2
        args.shapes, args.batches, args.moe, args.moe_batches, args.routings = (
            [(64, 96)],
            [1, 16],
            (8, 64, 32, 2),
            [1, 16],
            2,
        )
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu_kernels.py needs a CUDA device (or --smoke for a CPU check of the script)")
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        args.shapes, args.batches = [(8192, 8192), (14336, 4096)], [1, 4, 16, 64]
        args.moe, args.moe_batches, args.routings = (128, 2048, 768, 8), [1, 16, 64], 8
        print(f"device: {props.name}, L2 {l2 >> 20} MiB; CUDA kernels: {cuda_kernels.kernel_name()}")
        if not args.skip_tests:
            tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO / "tests")],
                                   capture_output=True, text=True)  # fmt: skip
            print(
                f"gpu tests: {tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else tests.stderr[-300:]}"
            )
    bandwidth = read_bandwidth(device, 0.01 if args.smoke else 4.0)
    print(f"bf16 read bandwidth: {bandwidth:.0f} GB/s")
    rows = bench_matrices(args, device, bandwidth, l2) + bench_moe(args, device, bandwidth, l2)
    print_rows(rows)
    summarize(rows)


if __name__ == "__main__":
    main()
