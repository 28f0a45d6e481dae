"""GPU kernels for packed experts. Without a GPU: the CUDA sources build for sm_80 and sm_90a (warnings are
errors), and the Triton grouped GEMM runs under `TRITON_INTERPRET=1` on CPU tensors against float64 references
computed from the packed data (every format, mixed formats in one launch, odd shapes, experts without tokens,
skipped slots). Tests marked `gpu` run the CUDA and Triton paths on a CUDA device."""

import os
import shutil

import pytest
import torch

from moecompress.runtime import cuda_kernels

from .test_native import FORMATS, float64_moe, mixed_experts, rel_err

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # set by conftest before any import
triton_moe = pytest.importorskip("moecompress.runtime.triton_moe", reason="triton is not installed")


def routed(tokens: int, num_experts: int = 8, top_k: int = 2):
    """Top-k ids over experts 0..num_experts-2 (the last gets no token), one slot skipped (-1) when there are
    several tokens, and softmax weights; fresh random draws."""
    ids = torch.stack([torch.randperm(num_experts - 1)[:top_k] for _ in range(tokens)])
    if tokens > 1:
        ids[1, 0] = -1
    return ids, torch.rand(tokens, top_k).softmax(-1)


def reference(module, x, ids, weights):
    return float64_moe(module, x, ids.clamp(min=0), weights * (ids >= 0))


def tables(module):
    return tuple(
        triton_moe.ProjectionTable.build([getattr(e, p) for e in module]) for p in ("gate_proj", "up_proj", "down_proj")
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here")
def test_cuda_sources_build_for_sm80_and_sm90a_without_warnings():
    cuda_kernels.compile_check()


def test_align_sorts_pairs_by_expert_in_padded_blocks():
    ids = torch.tensor([[3, 0], [3, 7], [-1, 0], [5, 3]])
    pairs, block_expert = triton_moe.align(ids, 6, 4)
    blocks = pairs.view(-1, 4)
    seen = []
    for expert, block in zip(block_expert.tolist(), blocks.tolist()):
        real = [p for p in block if p < ids.numel()]
        if expert >= 0:  # blocks of -1 (padding, ids outside [0, 6)) are never computed
            assert real and all(int(ids.view(-1)[p]) == expert for p in real)
            seen += real
    assert sorted(seen) == [p for p in range(ids.numel()) if 0 <= int(ids.view(-1)[p]) < 6]
    assert len(set(block_expert.tolist()) - {-1}) == 3  # experts 0, 3, 5: one block each at this size


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_triton_grouped_moe_matches_float64_for_mixed_formats(tokens):
    """Eight experts of twelve formats (2/3/4/8-bit, sym/asym, groups 32-128, per row, per tensor, g100,
    ternary in 2-bit codes and base-3), hidden 72 and intermediate 40 (not multiples of the 32-wide blocks)."""
    torch.manual_seed(torch.seed() % 2**31)
    module = mixed_experts(8)
    formats = {getattr(e, p).fmt.name for e in module for p in ("gate_proj", "up_proj", "down_proj")}
    assert len(formats) == len(FORMATS)
    x = torch.randn(tokens, 72)
    ids, weights = routed(tokens)
    y = triton_moe.experts_forward(tables(module), x, ids, weights)
    assert rel_err(y, reference(module, x, ids, weights)) < 1e-5


def test_triton_grouped_gemm_of_one_projection_per_format():
    """21 input columns (a partial byte and a partial group) and 5 rows, every format on its own."""
    from moecompress.formats import pack
    from moecompress.quant.rtn import quantize_rtn
    from moecompress.runtime.packed_experts import PackedLinear

    for fmt in FORMATS:
        linear = PackedLinear(5, 21, fmt)
        linear.load_packed(pack(quantize_rtn(torch.randn(5, 21), fmt)))
        table = triton_moe.ProjectionTable.build([linear])
        x = torch.randn(3, 21)
        pairs, block_expert = triton_moe.align(torch.zeros(3, 1, dtype=torch.int64), 1, 16)
        y = triton_moe.grouped_gemm(x, table, pairs, block_expert, 3, 1)
        assert rel_err(y, x.double() @ linear.dequantize(torch.float64).T) < 1e-5, fmt.name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tokens", [1, 4, 8, 40, 300])
def test_cuda_paths_match_float64(tokens):
    """Up to 8 tokens: the CUDA decode kernels; more: the Triton grouped GEMM (fp32 activations)."""
    module = mixed_experts(8).cuda()
    x = torch.randn(tokens, 72)
    ids, weights = routed(tokens)
    with torch.no_grad():
        assert module.gpu_usable(x.cuda())
        y = module(x.cuda(), ids.cuda(), weights.cuda()).cpu()
    assert rel_err(y, reference(module.cpu(), x, ids, weights)) < 1e-5
    if tokens <= cuda_kernels.DECODE_TOKENS:
        assert cuda_kernels.library() is not None, cuda_kernels.kernel_name()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_activations_stay_close():
    module = mixed_experts(8).cuda()
    x = torch.randn(40, 72)
    ids, weights = routed(40)
    with torch.no_grad():
        y = module(x.cuda().bfloat16(), ids.cuda(), weights.cuda()).float().cpu()
    assert rel_err(y, reference(module.cpu(), x, ids, weights)) < 2e-2


def test_gpu_bench_script_runs_end_to_end_in_smoke_mode():
    """The GPU bench runs only where a GPU is lent: its code paths are checked here on tiny CPU shapes."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "eval" / "bench_gpu_kernels.py"
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    for kernel in ("cuBLAS bf16", "torch dequant+matmul", "ours (triton)", "bf16 expert loop", "dequant+matmul loop"):
        assert any(kernel in r for r in rows), kernel
    assert "grouped w4" in result.stdout and "16 tokens, rows slower than bf16" in result.stdout
