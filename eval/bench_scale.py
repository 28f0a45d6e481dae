"""Scale of `compress`: synthetic Qwen3-MoE checkpoints (random bf16 weights, E=32, H=1024, I=512, top-4; see
eval/synthetic.py) of growing depth, each compressed by the CLI in a fresh process. Prints per run the
checkpoint's bf16 size, the process's peak RSS, wall time, time per decoder layer and per expert parameter, then
the issue-16 targets side by side: peak RSS flat in depth (32 layers <= 1.2x 4 layers) and below 35% of the bf16
size, per-layer time within 15% across depths, a SIGKILLed GPTQ run resumed to the same tensors (sha256) as an
uninterrupted one, and the peak RSS of `moecompress.load` on the 32-layer w4 output against its packed size.

    python eval/bench_scale.py [--layers 4 8 16 32] [--gptq-layers 8 32] [--kill-layers 16] [--work DIR]

The synthetic checkpoints are kept in --work (default /tmp/moecompress-scale) and reused by later runs; each is
read once before its run, so that all runs find their source in the page cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from synthetic import build

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"rtn": ROOT / "pipelines" / "rtn-w4g128.yaml", "gptq": ROOT / "pipelines" / "gptq-w4g128.yaml"}


def folder_bytes(folder: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


# The child reports its own peak (VmHWM): the rusage of a forked child also counts the parent's pages it held
# between fork and exec, which would charge this script's own memory to every run.
PEAK = (
    "import atexit, runpy, sys; atexit.register(lambda: print('VmHWM', open('/proc/self/status').read()"
    ".split('VmHWM:')[1].split()[0], file=sys.stderr)); sys.argv = sys.argv[1:]; "
)


def run(argv: list[str], kill_when: Path | None = None) -> tuple[int, float, float, str]:
    """(exit status, peak RSS in GB, seconds, stderr) of `python ARGV...` in a child process; SIGKILL it once
    `kill_when` exists (its peak is then unknown: 0)."""
    start = time.perf_counter()
    log = tempfile.TemporaryFile("w+")
    code = PEAK + ("runpy.run_module(sys.argv[0], run_name='__main__')" if argv[0] == "-m" else "exec(sys.argv[0])")
    argv = [sys.executable, "-c", code, *(argv[1:] if argv[0] == "-m" else argv)]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, text=True)
    while kill_when is not None and child.poll() is None and not kill_when.exists():
        time.sleep(0.05)
    if kill_when is not None and child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait()
    log.seek(0)
    err = log.read()
    if child.returncode not in (0, -signal.SIGKILL):
        sys.exit(f"{' '.join(argv)} failed:\n{err[-3000:]}")
    peak = [line.split()[1] for line in err.splitlines() if line.startswith("VmHWM ")]
    return child.returncode, int(peak[-1]) / 1e6 if peak else 0.0, time.perf_counter() - start, err


def warm(folder: Path) -> None:
    """Read the checkpoint once, so every run finds it in the page cache (the runs then compare computation,
    not which source happened to be cached)."""
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as fh:
            while fh.read(64 << 20):
                pass


def compress(
    src: Path, out: Path, method: str, extra: list[str] = (), kill_when: Path | None = None, resume: bool = False
) -> dict:
    """One CLI run; unless `resume`, the state an interrupted earlier run left is deleted first (it would resume)."""
    if not resume:
        shutil.rmtree(Path(str(out) + ".compress-state"), ignore_errors=True)
    warm(src)
    report = out.with_suffix(".json")
    argv = [
        "-m",
        "moecompress.cli",
        "compress",
        str(src),
        "--recipe",
        str(RECIPES[method]),
        "--num-samples",
        "8",
        "-o",
        str(out),
        "--overwrite",
        "--json",
        str(report),
        *extra,
    ]
    rc, rss, seconds, _ = run(argv, kill_when)
    return {
        "rc": rc,
        "rss_gb": rss,
        "seconds": seconds,
        **(json.loads(report.read_text())["result"] if rc == 0 else {}),
    }


def tensor_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                hashes[key] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()
    return hashes


def load_rss(ckpt: Path, dtype: str) -> dict[str, float]:
    """Peak RSS (GB) of a process that loads `ckpt` (warm in the page cache, the worst case) with `dtype` for the
    unquantized weights: right after `moecompress.load`, and after a 256-token forward (inference, no autograd)
    that routes to every expert, with that process's final anonymous and file-backed resident GB (the packed
    tensors are used in place from the mapped checkpoint, so pages of the experts used count as file-backed)."""
    warm(ckpt)
    code = (
        "import moecompress, torch; status = lambda: open('/proc/self/status').read(); "
        f"m = moecompress.load(sys.argv[1], dtype=torch.{dtype}); torch.set_grad_enabled(False); "
        "print('LOADED', status().split('VmHWM:')[1].split()[0], file=sys.stderr); "
        "m(input_ids=torch.randint(0, m.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))); "
        "print('RSS', *(status().split(k + ':')[1].split()[0] for k in ('RssAnon', 'RssFile')), file=sys.stderr)"
    )
    _, peak, _, err = run([code, str(ckpt)])
    lines = {line.split()[0]: line.split()[1:] for line in err.splitlines() if line.startswith(("LOADED ", "RSS "))}
    anon, file = (int(v) / 1e6 for v in lines["RSS"])
    return {"loaded": int(lines["LOADED"][0]) / 1e6, "peak": peak, "anonymous": anon, "file-backed": file}


def print_targets(rows: list[dict]) -> None:
    """The table, then the issue's targets: RSS flat in depth and small against the checkpoint, linear time."""
    print(
        "| recipe | layers | engine | bf16 on disk GB | peak RSS GB | RSS / bf16 | wall s | quantize s per layer | "
        "us per expert param |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} w4 | {r['layers']} | {r['engine']} | {r['bf16_gb']:.2f} | {r['rss_gb']:.2f} | "
            f"{r['rss_gb'] / r['bf16_gb']:.0%} | {r['seconds']:.1f} | {r['per_layer_s']:.2f} | "
            f"{r['us_per_expert_param']:.3f} |"
        )

    streamed = [r for r in rows if r["method"] == "rtn" and r["engine"] == "streamed"]
    small, big = streamed[0], streamed[-1]
    print(
        f"\npeak RSS {big['layers']} layers / {small['layers']} layers: {big['rss_gb'] / small['rss_gb']:.2f}x "
        f"(target <= 1.2x); {big['layers']} layers: {big['rss_gb'] / big['bf16_gb']:.0%} of its bf16 size "
        "(target < 35%)"
    )
    for method in ("rtn", "gptq"):
        times = [r["per_layer_s"] for r in rows if r["method"] == method and r["engine"] == "streamed"]
        if len(times) > 1:
            print(
                f"{method}: quantize seconds per layer {min(times):.2f}-{max(times):.2f}, spread "
                f"{max(times) / min(times) - 1:.0%} (target within 15%)"
            )


def kill_check(src: Path, n: int, work: Path) -> None:
    """SIGKILL a GPTQ run once half its layers are stored, rerun it, compare every tensor with an uninterrupted run."""
    ref, killed = work / f"kill-ref-{n}", work / f"kill-{n}"
    compress(src, ref, "gptq")
    state = Path(str(killed) + ".compress-state")
    r = compress(src, killed, "gptq", kill_when=state / f"layer-{n // 2:05d}.json")
    done = len(list(state.glob("layer-*.json")))
    resumed = compress(src, killed, "gptq", resume=True)
    same = tensor_hashes(ref) == tensor_hashes(killed)
    print(
        f"kill test, GPTQ {n} layers: SIGKILLed (exit {r['rc']}) with {done} layers stored; the rerun took "
        f"{resumed['seconds']:.1f} s against {n} layers' worth; sha256 of every tensor identical to an "
        f"uninterrupted run: {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--gptq-layers", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--kill-layers", type=int, default=16, help="depth of the SIGKILL/resume check (0: skip)")
    parser.add_argument("--in-memory-layers", type=int, default=8, help="depth of the --no-stream reference (0: skip)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moecompress-scale"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    depths = sorted(set(args.layers) | set(args.gptq_layers) | ({args.kill_layers} - {0}))
    sources = {}
    for n in depths:
        sources[n] = args.work / f"synthetic-{n}"
        if not (sources[n] / "config.json").is_file():
            print(f"building {sources[n]} ...", file=sys.stderr)
            build(sources[n], n)
    os.sync()  # the new checkpoints' write-back must not compete with the timed runs

    rows = []
    jobs = [("rtn", n, []) for n in args.layers] + [("gptq", n, []) for n in args.gptq_layers]
    if args.in_memory_layers:
        jobs.append(("rtn", args.in_memory_layers, ["--no-stream"]))
    for method, n, extra in jobs:
        out = args.work / f"out-{method}-{n}{'-mem' if extra else ''}"
        r = compress(sources[n], out, method, extra)
        per_layer = r["stage_seconds"]["quantize"] / n
        rows.append(
            {
                "method": method,
                "layers": n,
                "engine": r["engine"],
                "bf16_gb": folder_bytes(sources[n]) / 1e9,
                "rss_gb": r["rss_gb"],
                "seconds": r["seconds"],
                "per_layer_s": per_layer,
                "us_per_expert_param": 1e6 * r["seconds"] / r["expert_params"],
                "out": out,
            }
        )
        print(f"{method} {n} layers {r['engine']}: {r['rss_gb']:.2f} GB peak, {r['seconds']:.1f} s", file=sys.stderr)

    print_targets(rows)

    if args.kill_layers:
        kill_check(sources[args.kill_layers], args.kill_layers, args.work)

    w4 = next((r for r in reversed(rows) if r["method"] == "rtn" and r["engine"] == "streamed"), None)
    if w4 is not None:
        packed = folder_bytes(w4["out"]) / 1e9
        base = run(["import moecompress, torch"])[1]
        print(
            f"\nmoecompress.load of the {w4['layers']}-layer w4 output ({packed:.2f} GB packed on disk; python+torch+"
            f"moecompress alone {base:.2f} GB), target < 1.5x:"
        )
        print(
            "| dtype | peak after load GB | x packed | peak after a 256-token forward GB | x packed | anon / file GB |"
        )
        print("|---|---|---|---|---|---|")
        for dtype in ("float32", "bfloat16"):
            r = load_rss(w4["out"], dtype)
            print(
                f"| {dtype} | {r['loaded']:.2f} | {r['loaded'] / packed:.2f}x | {r['peak']:.2f} | "
                f"{r['peak'] / packed:.2f}x | {r['anonymous']:.2f} / {r['file-backed']:.2f} |"
            )


if __name__ == "__main__":
    main()
