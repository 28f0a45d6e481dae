"""Factoring one MoE block's routed experts into a quantized shared base and quantized per-expert deltas, with
each delta's form (rank and bits) chosen by the allocator's integer program under a byte budget.

Per projection: the base W_0 (routing-frequency-weighted mean of the experts) is GPTQ'd on the pooled Gram of all
the experts' inputs; each expert's delta is taken against the *quantized* base (so it also corrects the base's
rounding) and whitened by the expert's own Gram (SVD-LLM). The candidates of every (expert, projection) are: rank 0
(the base alone), a low-rank delta lora_B @ lora_A at (rank, format), or the whole delta dense in a format. Their
costs are the estimated output errors on the expert's calibration tokens relative to the projection's output
energy, weighted like the bit allocator's (routing frequency^alpha x mean routing weight^beta); their sizes are
their packed bytes. The multiple-choice knapsack (`allocation.solver`) picks one per item under the block's bytes
minus the base's. Base width 0 means no base: the deltas are then the experts themselves, so the same program
also covers mixed precision (dense candidates) and pruning (rank 0: an expert no token reaches costs nothing)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..allocation.solver import solve_allocation
from ..distributed import Ranks
from ..errors import BudgetError, RecipeError
from ..formats import SUPPORTED_BITS, PackedTensor, QTensor, QuantFormat, pack
from ..models.base import PROJECTIONS, ExpertWeights, MoEBlockView, modality_weights_problem
from ..runtime.factored_experts import DENSE, FactoredExperts
from .factored import candidate_errors, delta_spectrum, dense_errors, quantize_delta, whitening
from .subspace import average_merge


@dataclass
class FactorConfig:
    """Routed experts as a quantized shared base plus quantized per-expert deltas, low-rank or dense (D²-MoE),
    instead of quantizing each expert on its own (`factor:`; group size, symmetry and GPTQ settings come from
    `quantization:`).

    avg_bits: the budget, in stored bits per routed-expert parameter: base + deltas, scales and zeros included
            (4.19 is the size of w4g128; 8 is half of bf16).
    bits: the deltas' candidate widths. base_bits: the base's candidate widths, 0 for no base; each is tried and
            the plan of least estimated error kept.
    rank_steps: candidate ranks are the multiples of break-even rank / rank_steps (rounded up to 8), where the
            break-even rank out x in / (out + in) is where factors stop being smaller than a dense matrix.
    dense: also offer each delta dense in every width of `bits`.
    estimate: how a dense candidate's error is measured: gptq (the quantizer that will run: exact, one GPTQ pass per
            base width and expert for all widths) or rtn (round to nearest: faster, for very large models).
    whiten: truncate each delta, and measure every candidate's error, in the norm of its expert's outputs on the
            calibration tokens (SVD-LLM), not in the weights' Frobenius norm (GPTQ uses the expert's inputs either way).
    alpha, beta: the weights of routing frequency and mean routing weight in the costs (as `allocation:`).
    balance: every calibration source (calibration.dataset, vl_dataset) counts the same in the costs' frequencies
            and routing weights and in every Gram (whitening, GPTQ, error estimates), whatever its token count, and
            within one each modality by `modality_weights` (a VLM's few short image+text items against long text
            windows); false: every token counts the same.
    """

    enabled: bool = False
    avg_bits: float = 3.0
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    base_bits: list[int] = field(default_factory=lambda: [0, 4])
    rank_steps: int = 16
    dense: bool = True
    estimate: str = "gptq"
    whiten: bool = True
    alpha: float = 1.0
    beta: float = 1.5
    balance: bool = True
    modality_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 1.0, "audio": 1.0})

    def validate(self) -> FactorConfig:
        problems = []
        bad = [b for b in self.bits if b not in SUPPORTED_BITS] + [
            b for b in self.base_bits if b not in (0, *SUPPORTED_BITS)
        ]
        if bad or not self.bits or not self.base_bits:
            problems.append(
                f"factor.bits / base_bits {bad or '[]'}: use widths from {list(SUPPORTED_BITS)} (base 0: none)"
            )
        if not self.avg_bits > 0:
            problems.append(f"factor.avg_bits {self.avg_bits}: stored bits per expert parameter, > 0")
        if self.rank_steps < 1:
            problems.append(f"factor.rank_steps {self.rank_steps}: use 1 or more")
        if self.estimate not in ("gptq", "rtn"):
            problems.append(f"factor.estimate '{self.estimate}': use gptq or rtn")
        if self.alpha < 0 or self.beta < 0:
            problems.append(f"factor.alpha {self.alpha} / beta {self.beta}: use exponents >= 0")
        problems.append(modality_weights_problem(self.modality_weights, "factor"))
        problems = [p for p in problems if p]
        if problems:
            raise RecipeError("; ".join(problems))
        return self


Delta = tuple[PackedTensor, ...]  # (lora_A, lora_B) low-rank, (weight,) dense


@dataclass
class FactoredBlock:
    """What `factor_block` makes of a block: the packed base per projection (None: no base), per expert and
    projection its packed delta (None at rank 0), and the allocation's objective (importance-weighted estimated
    relative output errors)."""

    base: dict[str, PackedTensor] | None
    deltas: list[dict[str, Delta | None]]
    objective: float

    @property
    def ranks(self) -> list[list[int]]:
        """Per expert and projection: the delta's rank, 0 for none, -1 for dense."""
        return [[_rank(d[p]) for p in PROJECTIONS] for d in self.deltas]

    @property
    def nbytes(self) -> int:
        stored = [t for d in self.deltas for delta in d.values() if delta for t in delta]
        return sum(t.nbytes for t in [*(self.base or {}).values(), *stored])

    def summary(self) -> dict:
        """What was chosen, for reports: the base's format, how many expert projections got a dense, low-rank or no
        delta, their mean rank, the stored bytes and the objective (every rank is in the checkpoint's config)."""
        ranks = [r for per_expert in self.ranks for r in per_expert]
        low = [r for r in ranks if r > 0]
        return {
            "base": self.base["gate_proj"].fmt.name if self.base else None,
            "deltas": {"dense": ranks.count(DENSE), "low_rank": len(low), "none": ranks.count(0)},
            "mean_rank": sum(low) / len(low) if low else 0.0,
            "bytes": self.nbytes,
            "objective": self.objective,
        }


def _rank(delta: Delta | None) -> int:
    return 0 if delta is None else DENSE if len(delta) == 1 else delta[0].shape[0]


@dataclass
class _Item:
    """One (expert, projection) and its candidates' costs before importance, relative to its output energy:
    `low_rank[k, f]` at ranks[k + 1] and format f, `dense[f]`, `zero` at rank 0."""

    expert: int
    proj: str
    ranks: list[int]
    low_rank: torch.Tensor
    dense: torch.Tensor
    zero: float

    def error(self, rank: int, f: int) -> float:
        if rank == 0:
            return self.zero
        return float(self.dense[f] if rank == DENSE else self.low_rank[self.ranks.index(rank) - 1, f])


Quantizer = Callable[[torch.Tensor, torch.Tensor, list[QuantFormat]], list[QTensor]]  # w, hessian, each format


def check_budget(views: list[MoEBlockView], config: FactorConfig, fmt: Callable[[int], QuantFormat]) -> None:
    """Before any calibration: a budget below the smallest shared base (the base alone) fits no plan."""
    if min(config.base_bits) == 0:
        return
    for view in views:
        first = view.expert_weights(0)
        base = sum(fmt(min(config.base_bits)).nbytes(*first[p].shape) for p in PROJECTIONS)
        smallest = 8 * base / view.expert_params
        if config.avg_bits < smallest:
            raise BudgetError(
                f"factor.avg_bits {config.avg_bits:g} is infeasible for block {view.key}: the shared base alone takes "
                f"{smallest:.3g} bits per expert parameter; raise avg_bits, or add base width 0 (no base)."
            )


def candidate_ranks(out_features: int, in_features: int, steps: int) -> list[int]:
    """0 and multiples of a step (a multiple of 8) up to the break-even rank."""
    full = min(out_features * in_features // (out_features + in_features), out_features, in_features)
    step = max(8, (-(-full // steps) + 7) // 8 * 8)
    return [0, *range(step, full, step), full] if full > step else [0, full]


class _ExpertInputs:
    """Each expert's input Gram per projection (gate and up share one) and its whitening factor (None without
    `whiten` or tokens), made from the observer's sums when asked and held for one expert at a time (a DeepSeek-V3
    layer's all at once would take over 100 GB), and per projection the pooled Gram of all experts."""

    def __init__(self, observer, experts: int, whiten: bool):
        self.sums = {
            "gate_proj": observer.hessian_in,
            "up_proj": observer.hessian_in,
            "down_proj": observer.hessian_mid,
        }
        self.experts, self.whiten = experts, whiten
        self._held: tuple | None = None  # (key, Gram, whitening factor)
        self._pooled: dict[int, torch.Tensor | None] = {}

    def get(self, proj: str, expert: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Gram, whitening factor) of `expert`'s inputs to `proj`."""
        key = (id(self.sums[proj]), expert)
        if self._held is None or self._held[0] != key:
            self._held = None  # the last one is freed before the next is made
            gram = self.sums[proj].full(expert)
            self._held = (key, gram, whitening(gram) if gram is not None and self.whiten else None)
        return self._held[1], self._held[2]

    def pooled(self, proj: str) -> torch.Tensor | None:
        sums = self.sums[proj]
        if id(sums) not in self._pooled:
            total = None
            for e in range(self.experts):
                gram = sums.full(e)
                if gram is not None:
                    total = gram if total is None else total.add_(gram)
            self._pooled[id(sums)] = total
        return self._pooled[id(sums)]


@torch.no_grad()
def factor_block(
    view: MoEBlockView,
    observer,
    config: FactorConfig,
    fmt: Callable[[int], QuantFormat],
    quantize: Quantizer,
    workers: Ranks = Ranks(),
) -> FactoredBlock:
    """Factor `view`'s routed experts from what the calibration `observer` saw (its token counts, routing weights
    and per-expert Gram sums); `fmt(bits)` makes a format, `quantize(w, hessian, formats)` rounds a matrix in each
    format (GPTQ, one pass).
    Each base width of `config.base_bits` is tried and the plan of least estimated error kept. The block's expert
    weights are replaced by what the factors represent (later layers calibrate on them). With several `workers` (the
    ranks of an expert-parallel job, each holding the whole block and its observer), each measures and quantizes its
    share of the experts, rank 0 solves the program, and every rank ends with every expert's result."""
    E = view.num_experts
    originals = [view.expert_weights(e) for e in range(E)]
    if originals[0].gate_bias is not None:
        raise RecipeError("factor: experts with biases (GPT-OSS) cannot be factored yet; use quantization alone.")
    freqs = observer.weighted[:, 0]  # the base's weights: each expert's (weighted) token count
    importance = _importance(observer, config)
    formats = [fmt(b) for b in sorted(set(config.bits))]
    inputs = _ExpertInputs(observer, E, config.whiten)
    best = None
    for base_bits in sorted(set(config.base_bits)):
        base_format = fmt(base_bits) if base_bits else None
        base, base_hat, items = _candidates(originals, inputs, freqs, config, base_format, formats, quantize, workers)
        try:
            choice, objective = _on_first(workers, _allocate, items, formats, importance, config, base, originals[0])
        except BudgetError:
            if base_bits == max(config.base_bits) and best is None:
                raise
            continue
        if best is None or objective < best[0]:
            best = (objective, base, base_hat, items, choice)
    objective, base, base_hat, items, choice = best
    chosen = {(item.proj, item.expert): (item, r, f) for item, (r, f) in zip(items, choice)}
    deltas: list[dict] = [{} for _ in range(E)]
    done = []
    for e in workers.share(E):
        rebuilt = {}
        for p in PROJECTIONS:
            item, r, f = chosen[p, e]
            gram, lower = inputs.get(p, e)
            spec = None
            if r > 0:  # the spectrum the estimate read (dropped since: one per item for a whole layer is too much)
                spec = delta_spectrum(originals[e][p].float() - base_hat[p], originals[e][p], lower, item.ranks[-1])
            delta = originals[e][p].double() - base_hat[p].double()
            deltas[e][p], rebuilt[p] = _quantize(delta, spec, gram, r, formats[f] if r else None, quantize)
            rebuilt[p] = rebuilt[p] + base_hat[p]
        done.append((e, deltas[e], ExpertWeights(*(rebuilt[p] for p in PROJECTIONS))))
    for e, delta, weights in (d for share in workers.gathered(done) for d in share):
        deltas[e] = delta
        view.set_expert_weights(e, weights)
    return FactoredBlock(base, deltas, objective)


def _on_first(workers: Ranks, fn, *args):
    """`fn(*args)` computed by rank 0 and handed to every rank (its `BudgetError` raised on every rank)."""
    if not workers.multi:
        return fn(*args)
    try:
        result = fn(*args) if workers.first else None
    except BudgetError as exc:
        result = exc
    result = workers.from_first(result)
    if isinstance(result, BudgetError):
        raise result
    return result


def _importance(observer, config: FactorConfig) -> torch.Tensor:
    """Per expert frequency^alpha x mean routing weight^beta over the (weighted) calibration tokens."""
    tokens, routing = observer.weighted.unbind(-1)
    share = tokens / max(observer.weighted_total, 1e-30)
    weight = routing / tokens.clamp(min=1e-30)
    return share.clamp(min=0) ** config.alpha * weight.clamp(min=0) ** config.beta


def _quantize(delta: torch.Tensor, spec, gram, rank: int, fmt: QuantFormat | None, quantize: Quantizer):
    """(the packed delta or None, what it represents) for the chosen candidate."""
    if rank == 0:
        return None, torch.zeros_like(delta, dtype=torch.float32)
    if rank == DENSE:
        hessian = gram if gram is not None else torch.eye(delta.shape[1], device=delta.device)
        q = quantize(delta.float(), hessian.float(), [fmt])[0]
        return (pack(q),), q.dequantize()
    lora_a, lora_b = quantize_delta(delta, spec, rank, fmt, gram, lambda m, h, f: quantize(m, h, [f])[0])
    return (pack(lora_a), pack(lora_b)), lora_b.dequantize() @ lora_a.dequantize()


def _candidates(originals, inputs: _ExpertInputs, freqs, config, base_format, formats, quantize, workers=Ranks()):
    """Per projection the quantized base (GPTQ on the pooled Gram; zero without a base format), and per (expert,
    projection) its candidates' relative errors (items ordered by projection, then expert), expert by expert (each
    of `workers` its share)."""
    base, base_hat = ({} if base_format else None), {}
    for p in PROJECTIONS:
        if base_format is None:
            base_hat[p] = torch.zeros_like(originals[0][p], dtype=torch.float32)
        else:
            w0 = average_merge([w[p].float() for w in originals], freqs)
            pooled = inputs.pooled(p)
            hessian = pooled if pooled is not None else torch.eye(w0.shape[1], device=w0.device)
            (q,) = quantize(w0, hessian, [base_format])
            base[p], base_hat[p] = pack(q), q.dequantize()
    items = {}
    for e in workers.share(len(originals)):
        weights = originals[e]
        for p in PROJECTIONS:
            gram, lower = inputs.get(p, e)  # GPTQ takes the Gram either way
            w = weights[p].float()
            delta = w - base_hat[p]
            ranks = candidate_ranks(*w.shape, config.rank_steps)
            spec = delta_spectrum(delta, w, lower, ranks[-1])
            signal = max(spec.signal, 1e-30)
            low_rank = candidate_errors(spec, ranks[1:], formats, lower) / signal
            dense = torch.full((len(formats),), float("inf"))
            if config.dense:
                hessian = (gram if gram is not None else torch.eye(delta.shape[1], device=delta.device)).float()
                exact = (lambda m, fs, h=hessian: quantize(m, h, fs)) if config.estimate == "gptq" else None
                dense = dense_errors(delta, formats, lower, exact) / signal
            items[p, e] = _Item(e, p, ranks, low_rank, dense, float(spec.tail[0]) / signal)
    items = {key: item for share in workers.gathered(items) for key, item in share.items()}
    return base, base_hat, [items[p, e] for p in PROJECTIONS for e in range(len(originals))]


def _allocate(items: list[_Item], formats, importance, config, base, first) -> tuple[list[tuple[int, int]], float]:
    """(rank, format index) per item, and the objective, by the multiple-choice knapsack: candidate columns are
    (shape, rank, format) with rank 0 once per shape; an item may take only its shape's columns."""
    shapes = sorted({tuple(first[p].shape) for p in PROJECTIONS})
    ranks = [*items[0].ranks[1:], *([DENSE] if config.dense else [])]
    columns = [(s, 0, 0) for s in shapes] + [(s, r, f) for s in shapes for r in ranks for f in range(len(formats))]
    params = first.gate_proj.numel()  # every projection has out x in = I x H
    bits = [8 * _nbytes(formats[f], s, r) / params for s, r, f in columns]
    costs = torch.zeros(len(items), len(columns), dtype=torch.float64)
    allowed = torch.zeros(len(items), len(columns), dtype=torch.bool)
    for i, item in enumerate(items):
        shape = tuple(first[item.proj].shape)
        # without a base, rank 0 zeroes the projection, and with it the whole expert (the costs of its projections
        # add up, the program cannot see that): only for experts no calibration token reached
        zero_ok = base is not None or float(importance[item.expert]) == 0
        for c, (s, r, f) in enumerate(columns):
            if s == shape and (r != 0 or zero_ok):
                allowed[i, c] = True
                costs[i, c] = importance[item.expert] * item.error(r, f)
    base_bits = 8 * sum(t.nbytes for t in base.values()) / params if base else 0.0
    budget = config.avg_bits * len(items) - base_bits
    if budget < 0:
        raise BudgetError(
            f"factor.avg_bits {config.avg_bits:g} is below the shared base alone ({base_bits / len(items):.3g} bits per "
            "expert parameter); raise avg_bits or lower factor.base_bits."
        )
    groups = torch.zeros(len(items), dtype=torch.long)  # one program per block; its greedy start is within one
    # item of the optimum, and CBC's proof of the last 0.1 % over hundreds of candidates is not worth minutes
    choice = solve_allocation(
        costs, torch.ones(len(items)), bits, groups, {0: budget}, allowed, time_limit=10, gap=5e-3
    )
    objective = float(costs.gather(1, choice[:, None]).sum())
    return [(columns[c][1], columns[c][2]) for c in choice.tolist()], objective


def _nbytes(fmt: QuantFormat, shape: tuple[int, int], rank: int) -> int:
    if rank == 0:
        return 0
    if rank == DENSE:
        return fmt.nbytes(*shape)
    return fmt.nbytes(rank, shape[1]) + fmt.nbytes(shape[0], rank)


def install_factored_experts(view: MoEBlockView, block: FactoredBlock) -> FactoredExperts:
    """Replace the block's experts module with a `FactoredExperts` holding `block`."""
    module = restore_factored_experts(view, block_layout(block), device=None)
    for p in PROJECTIONS:
        if block.base:
            getattr(module.base, p).load_packed(block.base[p])
        for e, d in enumerate(block.deltas):
            getattr(module[e], p).load(d[p])
    return module


def block_layout(block: FactoredBlock) -> dict:
    """The block's layout as JSON (a streamed run's layer record): the base's formats (or None) and per expert and
    projection (rank, first format, second format)."""

    def encode(delta: Delta | None) -> list:
        rank, *fmts = _spec(delta)
        return [rank, *(f.to_dict() if f is not None else None for f in fmts)]

    return {
        "base": {p: t.fmt.to_dict() for p, t in block.base.items()} if block.base else None,
        "deltas": [{p: encode(delta) for p, delta in d.items()} for d in block.deltas],
    }


def restore_factored_experts(view: MoEBlockView, layout: dict, device: str | None = "meta") -> FactoredExperts:
    """Replace the block's experts module with an empty `FactoredExperts` of `layout` (`block_layout`), on the meta
    device by default (a streamed layer whose tensors are already on disk)."""

    def decode(fmt: dict | None) -> QuantFormat | None:
        return QuantFormat.from_dict(fmt) if fmt is not None else None

    base = {p: QuantFormat.from_dict(f) for p, f in layout["base"].items()} if layout["base"] else None
    deltas = [{p: (r, decode(a), decode(b)) for p, (r, a, b) in d.items()} for d in layout["deltas"]]
    with torch.device(device) if device else contextlib.nullcontext():
        module = FactoredExperts(view.hidden_size, view.intermediate_size, base, deltas, view.activation)
    view.experts = module
    return module


def _spec(delta: Delta | None) -> tuple[int, QuantFormat | None, QuantFormat | None]:
    """(rank, first format, second format) as `FactoredExperts` takes a delta's layout."""
    if delta is None:
        return (0, None, None)
    return (_rank(delta), delta[0].fmt, delta[1].fmt if len(delta) == 2 else None)
