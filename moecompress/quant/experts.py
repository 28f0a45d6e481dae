"""Quantize the routed experts of one MoE block from what the calibration pass observed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import NonFiniteError
from ..formats import PackedTensor, QTensor, QuantFormat, pack
from ..models.base import PROJECTIONS, ExpertWeights, MoEBlockView
from ..runtime.packed_experts import PackedExperts
from .gptq import quantize_gptq_shared
from .rtn import quantize_rtn

if TYPE_CHECKING:  # the observer is handed in; quant does not depend on calibration
    from ..calibration.engine import ExpertObserver

RARE_POLICIES = ("pool", "rtn", "own")


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128
    clip_search: bool = False
    ternary_scale: str = "lsq"


@dataclass(frozen=True)
class RareExpertPolicy:
    """What to do with an expert routed fewer than `min_tokens` calibration tokens.

    pool: add random block-input tokens (the observer's reservoir) to its own until it has `min_tokens`,
          each pooled token weighted like an own token; GPTQ then runs on that Hessian.
    rtn:  round-to-nearest instead of GPTQ.
    own:  GPTQ on its own tokens whatever their number (RTN when it saw none).
    """

    policy: str = "pool"
    min_tokens: int = 256

    def __post_init__(self) -> None:
        if self.policy not in RARE_POLICIES:
            raise ValueError(f"rare-expert policy '{self.policy}' is not one of {RARE_POLICIES}")


@dataclass
class ExpertQuantReport:
    layer: int | str  # the block's key
    expert: int
    tokens: int
    method: str


def expert_hessians(
    view: MoEBlockView, observer: ExpertObserver, expert: int, rare: RareExpertPolicy
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(H for gate/up inputs, H for down inputs, tokens used), or None when GPTQ should not run."""
    own = int(observer.tokens[expert].sum())
    h_in, h_mid = observer.hessian_in.pop(expert), observer.hessian_mid.pop(expert)  # freed as used
    if own < rare.min_tokens and rare.policy == "rtn":
        return None
    if own < rare.min_tokens and rare.policy == "pool":
        pool = observer.reservoir_tokens()[: rare.min_tokens - own].to(view.device)
        if pool.numel():
            mid, _ = view.expert_forward(expert, pool)
            h_in = pool.T @ pool if h_in is None else h_in + pool.T @ pool
            h_mid = mid.T @ mid if h_mid is None else h_mid + mid.T @ mid
            own += pool.shape[0]
    if h_in is None:
        return None
    return h_in, h_mid, own


def quantize_matrix(w: torch.Tensor, hessian: torch.Tensor | None, fmt: QuantFormat, gptq: GPTQOptions, where: str):
    """`w` [out, in] rounded to `fmt`: GPTQ on `hessian`, or round-to-nearest without one. Source weights with NaN/Inf
    and scales that overflow float16 are refused, naming `where` (layer, expert, projection)."""
    return quantize_matrices([w], hessian, [fmt], gptq, [where])[0]


def quantize_matrices(
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    formats: list[QuantFormat],
    gptq: GPTQOptions,
    where: list[str],
) -> list[QTensor]:
    """`quantize_matrix` of each `weights[k]` in `formats[k]`, all on the same inputs (an expert's gate and up, or one
    matrix in several formats): with a Hessian, one GPTQ pass per group size shares its factorization and loop."""
    for w, name in zip(weights, where):
        if not bool(torch.isfinite(w).all()):
            raise NonFiniteError(f"{name}: the source weight holds NaN/Inf values; fix or re-download the model.")
    if hessian is None:
        out = [quantize_rtn(w, f, gptq.clip_search, gptq.ternary_scale) for w, f in zip(weights, formats)]
    else:
        out = [None] * len(weights)
        passes: dict[int, list[int]] = {}  # one pass per group size
        for k, (w, f) in enumerate(zip(weights, formats)):
            passes.setdefault(f.effective_group(w.shape[1]), []).append(k)
        options = (gptq.damp, gptq.act_order, gptq.block_size, gptq.clip_search, gptq.ternary_scale)
        for ks in passes.values():
            shared = quantize_gptq_shared([weights[k] for k in ks], hessian, [formats[k] for k in ks], *options)
            for k, q in zip(ks, shared):
                out[k] = q
    for q, name in zip(out, where):
        if not bool(torch.isfinite(q.scales.float()).all()):
            raise NonFiniteError(
                f"{name}: a quantization scale overflows float16 (|w| > 65504 x levels); "
                "this weight cannot be stored in this format."
            )
    return out


@torch.no_grad()
def quantize_block_experts(
    view: MoEBlockView,
    observer: ExpertObserver,
    formats: list[dict[str, QuantFormat]],
    method: str = "gptq",
    gptq: GPTQOptions = GPTQOptions(),
    rare: RareExpertPolicy = RareExpertPolicy(),
    after_expert: Callable[[], None] | None = None,
) -> tuple[list[dict[str, PackedTensor]], list[ExpertQuantReport]]:
    """Quantize every routed expert of `view` to `formats[e][projection]`, write the dequantized weights
    back into the block (so later layers calibrate on the quantized model) and return the packed tensors.
    `after_expert` runs after each expert (a streamed run hands freed heap memory back there: GPTQ's
    mid-size temporaries otherwise fragment it, and peak memory varied by 15% from run to run)."""
    packed, reports = [], []
    for e in range(view.num_experts):
        weights = view.expert_weights(e)
        hessians = expert_hessians(view, observer, e, rare) if method == "gptq" else None
        quantized = {}
        for i, projs in enumerate((("gate_proj", "up_proj"), ("down_proj",))):  # gate and up share their inputs
            h = None if hessians is None else hessians[i]
            ws, fmts = [weights[p].float() for p in projs], [formats[e][p] for p in projs]
            names = [f"layer {view.key} expert {e} {p}" for p in projs]
            quantized.update(zip(projs, quantize_matrices(ws, h, fmts, gptq, names)))
        view.set_expert_weights(e, ExpertWeights(*(quantized[p].dequantize() for p in PROJECTIONS)))
        packed.append({p: pack(q) for p, q in quantized.items()})
        tokens = int(observer.tokens[e].sum())
        reports.append(ExpertQuantReport(view.key, e, tokens, "gptq" if hessians is not None else "rtn"))
        if after_expert is not None:
            after_expert()
    return packed, reports


def install_packed_experts(
    view: MoEBlockView,
    packed: list[dict[str, PackedTensor]] | None,
    reports: list[ExpertQuantReport],
    formats: list[dict[str, QuantFormat]] | None = None,
) -> PackedExperts:
    """Replace the block's fused experts module with a `PackedExperts` holding `packed` (and the experts' biases,
    where the architecture has them); with `packed` None, an empty one of `formats` on the meta device (a
    streamed layer whose tensors are already on disk)."""
    first = view.expert_weights(0)
    hidden, intermediate = first.down_proj.shape
    bias = first.gate_bias is not None
    formats = formats or [{p: t.fmt for p, t in e.items()} for e in packed]
    with torch.device("meta") if packed is None else contextlib.nullcontext():
        module = PackedExperts(hidden, intermediate, formats, view.activation, bias)
    for e, (expert, report) in enumerate(zip(module, reports)):
        weights = view.expert_weights(e) if bias and packed is not None else None
        for proj in PROJECTIONS:
            linear = getattr(expert, proj)
            if packed is not None:
                linear.load_packed(packed[e][proj])
                if weights is not None:
                    linear.bias.copy_(weights.bias(proj))
            linear.method = report.method
    view.block.experts = module
    return module
