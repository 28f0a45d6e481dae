"""The memory budget of a streamed run: how many of a layer's routed experts are worked on at once.

A streamed run holds one decoder layer. When a layer's experts in the compute dtype, with their statistics, do not
fit the budget (`calibration.max_memory`), the engine reads, observes, quantizes and writes them a chunk of experts
at a time (`engine.run_layerwise` with `Walk.chunks`). The estimate counts what the process already holds, the
layer outside its experts, the calibration activations, and per expert its weights (as read and as cast), its
statistics (GPTQ's Hessian triangles) and the largest transient of the method (GPTQ's float64 factorization)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from ..errors import InsufficientMemoryError, RecipeError

log = logging.getLogger(__name__)

UNITS = {
    "": 1,
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
DEFAULT_SHARE = 0.85  # of the memory free at the start, when the recipe gives no budget
GPTQ_WORK = 48  # bytes per Hessian entry while GPTQ factors it (float32 copies, float64 Cholesky and inverse)
GPTQ_BATCH, GPTQ_BATCH_WORK = 32, 1 << 28  # GPTQ of small experts: at most this many, in this many work bytes


def parse_size(value: str | int) -> int:
    """Bytes from 6GB, 500MB, 2GiB or a number of bytes; ValueError naming the form otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).upper() not in UNITS:
            raise ValueError(f"{value!r} is not a size; write e.g. 6GB, 500MB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = number * UNITS[unit]
    if not 1 <= size < float("inf"):
        raise ValueError(f"{value!r} is not a positive size; write e.g. 6GB")
    return int(size)


@dataclass(frozen=True)
class LayerCost:
    """Bytes of one decoder layer at work. `fixed`: what the process holds anyway (its resident set at planning, the
    calibration activations); `outside`: the layer's tensors outside its routed experts; per expert, `expert` (its
    weights as read and as cast) and `statistics`; `working`: one expert's transient; `chunked`: what a chunked
    layer holds on top (the experts' recorded inputs and their summed outputs)."""

    experts: int
    fixed: int
    outside: int
    expert: int
    statistics: int
    working: int
    chunked: int

    def peak(self, chunk: int) -> int:
        extra = 0 if chunk >= self.experts else self.chunked
        return self.fixed + self.outside + chunk * (self.expert + self.statistics) + self.working + extra

    def largest_chunk(self, budget: int) -> int:
        """The most experts a chunk can hold under `budget` (0: not even one)."""
        room = budget - self.peak(0) - self.chunked
        return max(0, min(self.experts, room // (self.expert + self.statistics)))


@dataclass
class MemoryPlan:
    """Per decoder layer the experts worked on at once (None: no MoE block), with the estimated peak."""

    budget: int
    outside: int = 0  # the peak of the passes outside the layers
    chunks: list[int | None] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)

    def chunk(self, layer: int) -> int | None:
        """Experts per chunk of a layer that is chunked; None for a layer worked on whole."""
        size = self.chunks[layer]
        return size if size is not None and size < self.experts[layer] else None

    @property
    def chunked(self) -> bool:
        return any(self.chunk(i) is not None for i in range(len(self.chunks)))

    def describe(self) -> str:
        peak = max([*self.peaks, self.outside])
        head = f"memory budget {self.budget / 1e9:.2f} GB, estimated peak {peak / 1e9:.2f} GB"
        groups: dict[tuple, list[int]] = {}
        for i, size in enumerate(self.chunks):
            if size is not None:
                groups.setdefault((size, self.experts[i]), []).append(i)
        parts = []
        for (size, experts), layers in groups.items():
            where = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
            if size >= experts:
                parts.append(f"{where}: {experts} experts at once")
            else:
                parts.append(f"{where}: {math.ceil(experts / size)} chunks of {size} experts (one pass each)")
        return head + ("; " + "; ".join(parts) if parts else "")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(
    costs: list[LayerCost],
    outside: int,
    budget: int,
    fixed_chunk: int | None,
    cannot_chunk: Callable[[int], str | None],
) -> MemoryPlan:
    """The plan for `costs` (per decoder layer) and `outside` (the peak of the passes outside the layers) under
    `budget`. `fixed_chunk`: the user's chunk size; `cannot_chunk(layer)`: why the walk must hold that layer whole
    (None: it can chunk it). Refuses in one line, naming the smallest budget that works, when something cannot
    fit."""
    if outside > budget:
        raise InsufficientMemoryError(
            f"the embeddings, head and calibration activations alone need {_gb(outside)}, over the memory budget of "
            f"{_gb(budget)}; raise calibration.max_memory (--max-memory) or use fewer calibration samples."
        )
    plan = MemoryPlan(budget, outside)
    for index, cost in enumerate(costs):
        whole = cost.peak(cost.experts)
        size = cost.experts if whole <= budget else cost.largest_chunk(budget)
        why = "it has no routed experts to split" if cost.experts == 0 else cannot_chunk(index)
        if fixed_chunk is not None and cost.experts and why is None:
            size = min(fixed_chunk, cost.experts)
        if why is not None and size < cost.experts or cost.experts == 0 and whole > budget:
            raise InsufficientMemoryError(
                f"decoder layer {index} needs {_gb(whole)} whole, over the memory budget of {_gb(budget)}, and "
                f"{why}; raise calibration.max_memory (--max-memory) to {_gb(whole)} or more."
            )
        if cost.experts and size < 1:
            raise InsufficientMemoryError(
                f"decoder layer {index} needs {_gb(cost.peak(1))} even one expert at a time (the process holds "
                f"{_gb(cost.fixed)} with the calibration activations); the smallest --max-memory that works is "
                f"{_gb(cost.peak(1))}, or use fewer calibration samples."
            )
        plan.chunks.append(size if cost.experts else None)
        plan.peaks.append(cost.peak(size))
        plan.experts.append(cost.experts)
    return plan


def budget_bytes(max_memory: str | int | None, free: int, resident: int) -> int:
    """The recipe's budget in bytes; by default the process's resident set and `DEFAULT_SHARE` of `free`."""
    if max_memory is None:
        return resident + int(DEFAULT_SHARE * free)
    try:
        return parse_size(max_memory)
    except ValueError as exc:
        raise RecipeError(f"calibration.max_memory: {exc}") from None


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def layer_costs(loaded, batches, cal, statistics, resident: int, ranks=None) -> tuple[list[LayerCost], int]:
    """Per decoder layer of the streamed model `loaded` its `LayerCost` for calibration `batches` held as `cal` says
    and a method collecting `statistics`; and the peak of the passes outside the layers (the embedding pass, the
    final write: everything outside the layers as read and as cast, next to the activations). With several `ranks`
    (`distributed.Ranks`): one rank's, its share of each layer's experts, always worked on in chunks, with every
    expert's outputs kept per top-k slot."""
    import torch

    model, adapter = loaded.model, loaded.adapter
    compute = torch.empty(0, dtype=loaded.dtype).element_size()
    held = torch.empty(0, dtype=getattr(torch, cal.activation_dtype)).element_size()
    views = {v.layer_index: v for v in adapter.moe_blocks(model)}
    hidden = next(iter(views.values())).hidden_size
    tokens = sum(b.num_tokens for b in batches)
    batch = max((b.num_tokens for b in batches), default=0)
    kept = 2 * (batch if cal.offload_activations else tokens) * hidden * held  # a layer's inputs and outputs
    fixed = resident + kept + 8 * batch * hidden * 4  # and one batch's intermediates in the layer
    costs = []
    for index, layer in enumerate(loaded.layers):
        params = sum(p.numel() for p in layer.parameters())
        view = views.get(index)
        if view is None:
            costs.append(LayerCost(0, fixed, params * compute, 0, 0, 0, 0))
            continue
        experts, inner = view.num_experts, view.intermediate_size
        each = view.expert_params // experts
        read = _stored_size(loaded, index, compute)
        hessian = "hessian" in statistics
        cost = LayerCost(
            experts=experts,
            fixed=fixed,
            outside=(params - each * experts) * compute,
            expert=each * (compute + read),
            statistics=4 * (hidden * (hidden + 1) + inner * (inner + 1)) // 2 if hessian else 0,
            working=_gptq_work(max(hidden, inner)) if hessian else 3 * each * compute,
            chunked=3 * tokens * hidden * 4 + tokens * view.top_k * 12,
        )
        if ranks is not None and ranks.multi:
            slots = tokens * view.top_k * hidden * compute
            cost = replace(cost, experts=len(ranks.share(experts)), fixed=fixed + cost.chunked + slots)
        costs.append(cost)
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in loaded.layers.parameters())
    return costs, resident + kept + outside * (compute + 2)


def gptq_experts_at_once(width: int) -> int:
    """Experts whose widest matrix side is `width` that one batched GPTQ takes (`quant.gptq.quantize_gptq_batched`):
    as many as fit `GPTQ_BATCH_WORK` (their factorizations at once), at most `GPTQ_BATCH`; large ones one at a time."""
    return max(1, min(GPTQ_BATCH, GPTQ_BATCH_WORK // (GPTQ_WORK * width * width)))


def _gptq_work(width: int) -> int:
    """GPTQ's transient for experts whose widest side is `width`, factored `gptq_experts_at_once` at a time."""
    return gptq_experts_at_once(width) * GPTQ_WORK * width * width


def _stored_size(loaded, index: int, compute: int) -> int:
    """Bytes per element of a layer's routed experts as stored (a dequantized source: as computed)."""
    stored = [loaded.tensors[k] for k in loaded.expert_keys.get(index) or loaded.layer_keys.get(index, [])]
    return max(
        (t.nbytes // max(1, math.prod(t.shape)) if t.dtype.startswith(("F", "BF")) else compute for t in stored),
        default=compute,
    )


def budget_problem(cal) -> str | None:
    """What is wrong with the calibration section's `max_memory` / `experts_per_chunk`, or None."""
    if cal.max_memory is not None:
        try:
            parse_size(cal.max_memory)
        except ValueError as exc:
            return f"calibration.max_memory: {exc}"
    chunk = cal.experts_per_chunk
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        return f"calibration.experts_per_chunk {chunk!r}: use a number of experts >= 1, or leave it out"
    return None
