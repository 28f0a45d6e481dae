"""Quantize the routed experts of one MoE block from what the calibration pass observed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import NonFiniteError
from ..formats import PackedTensor, QTensor, QuantFormat, pack
from ..models.base import PROJECTIONS, ExpertWeights, MoEBlockView
from .config import RareExpertConfig
from .methods import Quantizer

if TYPE_CHECKING:  # the observer is handed in; quant does not depend on calibration
    from ..calibration.engine import ExpertObserver


@dataclass
class ExpertQuantReport:
    layer: int | str  # the block's key
    expert: int
    tokens: int
    method: str


def expert_hessians(
    view: MoEBlockView, observer: ExpertObserver, expert: int, rare: RareExpertConfig
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


def quantize_matrices(
    weights: list[torch.Tensor],
    hessian: torch.Tensor | None,
    formats: list[QuantFormat],
    quantizer: Quantizer,
    where: list[str],
) -> list[QTensor]:
    """Each `weights[k]` [out, in] rounded to `formats[k]` by `quantizer`, all on the same inputs `hessian` (an
    expert's gate and up, or one matrix in several formats; None: round-to-nearest). Source weights with NaN/Inf and
    scales that overflow float16 are refused, naming `where` (layer, expert, projection)."""
    return quantize_experts_matrices([(weights, hessian)], formats, quantizer, [where])[0]


def quantize_experts_matrices(
    problems: list[tuple[list[torch.Tensor], torch.Tensor | None]],
    formats: list[QuantFormat],
    quantizer: Quantizer,
    where: list[list[str]],
) -> list[list[QTensor]]:
    """`quantize_matrices` of several experts at once (`problems`: each one's weights and Hessian, all in
    `formats`; `where`: each one's names), in one call of the quantizer (batched GPTQ)."""
    for (weights, _), names in zip(problems, where):
        for w, name in zip(weights, names):
            if not bool(torch.isfinite(w).all()):
                raise NonFiniteError(f"{name}: the source weight holds NaN/Inf values; fix or re-download the model.")
    out = quantizer.quantize_experts(problems, formats)
    for quantized, names in zip(out, where):
        for q, name in zip(quantized, names):
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
    quantizer: Quantizer,
    after_expert: Callable[[], None] | None = None,
) -> tuple[list[dict[str, PackedTensor]], list[ExpertQuantReport]]:
    """Quantize every routed expert of `view` (or the chunk it holds) to `formats[e][projection]`, write the
    dequantized weights back into the block (so later layers calibrate on the quantized model) and return the packed
    tensors. Experts go `quantizer.experts_at_once` at a time (GPTQ: small experts share one column loop).
    `after_expert` runs after each expert (a streamed run hands freed heap memory back there: GPTQ's mid-size
    temporaries otherwise fragment it, and peak memory varied by 15% from run to run)."""
    packed, reports, held = [], [], list(view.held)
    size = quantizer.experts_at_once(max(view.expert_weights(held[0]).down_proj.shape))
    for start in range(0, len(held), size):
        batch = held[start : start + size]
        quantized, methods = _quantize_batch(view, observer, formats, quantizer, batch)
        for e in batch:
            view.set_expert_weights(e, ExpertWeights(*(quantized[e][p].dequantize() for p in PROJECTIONS)))
            packed.append({p: pack(q) for p, q in quantized.pop(e).items()})
            reports.append(ExpertQuantReport(view.key, e, int(observer.tokens[e].sum()), methods[e]))
            if after_expert is not None:
                after_expert()
    return packed, reports


def _quantize_batch(view, observer, formats, quantizer, batch: list[int]):
    """The experts `batch` of `view` quantized ({expert: {projection: QTensor}}) and the method each used; gate and
    up share their inputs, and experts in the same formats go through the quantizer together."""
    wants = "hessian" in quantizer.statistics
    hessians = {e: expert_hessians(view, observer, e, quantizer.config.rare_experts) if wants else None for e in batch}
    weights = {e: view.expert_weights(e) for e in batch}
    quantized: dict[int, dict[str, QTensor]] = {e: {} for e in batch}
    for i, projs in enumerate((("gate_proj", "up_proj"), ("down_proj",))):
        same: dict[tuple, list[int]] = {}
        for e in batch:
            same.setdefault(tuple(formats[e][p] for p in projs), []).append(e)
        for fmts, experts in same.items():
            problems = [([weights[e][p].float() for p in projs], _nth(hessians[e], i)) for e in experts]
            where = [[f"layer {view.key} expert {e} {p}" for p in projs] for e in experts]
            for e, qs in zip(experts, quantize_experts_matrices(problems, list(fmts), quantizer, where)):
                quantized[e].update(zip(projs, qs))
    return quantized, {e: quantizer.used(_nth(hessians[e], 0)) for e in batch}


def _nth(hessians, i: int):
    return None if hessians is None else hessians[i]
