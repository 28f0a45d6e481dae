"""Turn `ExpertStats` (importance + measured quantization error) into a `CompressionPlan`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..calibration.stats import ExpertStats
from ..errors import BudgetError, RecipeError
from ..formats import SUPPORTED_BITS, TERNARY, IntFormat, QuantFormat
from ..models.base import MODALITIES, PROJECTIONS, modality_weights_problem
from .plan import CompressionPlan
from .solver import random_allocation, ranked_allocation, solve_allocation

ALLOCATION_METHODS = ("uniform", "lp", "random", "frequency")


@dataclass
class AllocationConfig:
    """How bits are spread over routed experts.

    candidates: integer widths from 2/3/4/8 and "ternary" (the recipe's ternary format).
    avg_bits: the budget, as average code bits per expert parameter of the integer formats; a candidate is
            charged its true storage (codes + scales + zeros), so a plan with ternary experts has the size
            of an all-integer plan at avg_bits.
    method: uniform (every expert at quantization.bits) | lp (integer program, MC PMQ) |
            random / frequency (baselines: the two candidates around avg_bits, the upper one given at
            random or to the most frequently routed experts).
    max_bytes: a byte budget for the whole checkpoint's weight files instead of avg_bits (the unquantized
            tensors and the experts' scales/zeros are subtracted first).
    Cost of giving item i candidate b (lp): frequency_i^alpha * routing_weight_i^beta * error_{i,b}^alpha,
    error = block-output error of RTN at b per profiled token; frequency and routing weight mix the
    modalities with `modality_weights`.
    """

    method: str = "uniform"
    avg_bits: float = 3.0
    max_bytes: int | None = None
    candidates: list[int | str] = field(default_factory=lambda: [2, 3, 4])
    scope: str = "layer"
    granularity: str = "expert"
    alpha: float = 1.0
    beta: float = 1.5
    modality_weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 1.0, "audio": 1.0})
    fixed: dict[str, int | str] = field(default_factory=dict)
    profile_tokens: int = 4096
    seed: int = 0

    def validate(self) -> AllocationConfig:
        problems = []
        if self.method not in ALLOCATION_METHODS:
            problems.append(f"allocation.method '{self.method}': use one of {list(ALLOCATION_METHODS)}")
        if self.scope not in ("layer", "global"):
            problems.append(f"allocation.scope '{self.scope}': use layer or global")
        if self.granularity not in GRANULARITIES:
            problems.append(f"allocation.granularity '{self.granularity}': use one of {list(GRANULARITIES)}")
        if self.granularity in POOLED and self.method != "lp":
            problems.append(f"allocation.granularity {self.granularity} is solved by method lp only")
        bad = [b for b in [*self.candidates, *self.fixed.values()] if b not in (*SUPPORTED_BITS, TERNARY)]
        if bad or not self.candidates:
            problems.append(f"allocation candidates/fixed {bad or '[]'}: use values from {[*SUPPORTED_BITS, TERNARY]}")
        if self.max_bytes is not None and (not isinstance(self.max_bytes, int) or self.max_bytes <= 0):
            problems.append(f"allocation.max_bytes {self.max_bytes!r}: use a positive number of bytes")
        if self.alpha < 0 or self.beta < 0:
            problems.append(f"allocation.alpha {self.alpha} / beta {self.beta}: use exponents >= 0")
        if not 0 < self.profile_tokens:
            problems.append(f"allocation.profile_tokens {self.profile_tokens}: use 1 or more")
        problems.append(modality_weights_problem(self.modality_weights, "allocation"))
        problems = [p for p in problems if p]
        if problems:
            raise RecipeError("; ".join(problems))
        return self

    def check_budget(self, candidate_formats: list[QuantFormat], integer_format: QuantFormat) -> None:
        """Known before any profiling: an avg_bits below the cheapest candidate's cost fits no plan."""
        if self.method == "uniform" or self.max_bytes is not None:
            return
        cheapest = min(candidate_formats, key=storage_bits)
        smallest = storage_bits(cheapest) - (storage_bits(integer_format) - integer_format.code_bits)
        if self.avg_bits < smallest - 1e-9:
            raise BudgetError(
                f"allocation.avg_bits {self.avg_bits:g} is infeasible: the smallest feasible budget is "
                f"{smallest:.4g} (every expert at {cheapest.name}). Raise avg_bits or add a smaller candidate."
            )

    @property
    def profile_keys(self) -> list[int | str]:
        return sorted(set(self.candidates) | set(self.fixed.values()), key=_key_order)


GRANULARITIES = ("expert", "projection", "layer", "layer-projection")
POOLED = ("layer", "layer-projection")  # one format for every expert of a layer (per projection): GGUF can hold these


def _key_order(key: int | str) -> float:
    return 1.6 if key == TERNARY else float(key)


def storage_bits(fmt: QuantFormat) -> float:
    """Bits per weight on disk: codes plus scales/zeros (per-row/per-tensor scales counted as free)."""
    return fmt.code_bits + (fmt.overhead_bits(fmt.group_size) if fmt.group_size > 0 else 0.0)


def avg_bits_for_bytes(
    max_bytes: int, fixed_bytes: int, expert_params: int, candidates: list[QuantFormat], integer_format: QuantFormat
) -> float:
    """The avg_bits budget (integer-format code bits per expert parameter) that fills `max_bytes`, given
    `fixed_bytes` of unquantized tensors."""
    overhead = storage_bits(integer_format) - integer_format.code_bits
    avg = (max_bytes - fixed_bytes) * 8 / expert_params - overhead
    cheapest = min(candidates, key=storage_bits)
    if avg + overhead < storage_bits(cheapest):
        smallest = fixed_bytes + expert_params * storage_bits(cheapest) / 8
        raise BudgetError(
            f"a budget of {max_bytes} bytes is infeasible: the unquantized tensors alone take {fixed_bytes} bytes and the "
            f"smallest feasible budget is {int(smallest) + 1} bytes (every expert at {cheapest.name})."
        )
    return avg


def _solve_pooled(granularity, E, P, costs, sizes, bit_list, groups, budgets, allowed) -> torch.Tensor:
    """The LP over whole layers (or a layer's projection across its experts): one format for all the experts of a
    pool, as llama.cpp stores a layer's experts (one tensor, one type); a pool's cost and size are its members'
    sums. Returns the choice per item."""
    n = costs.shape[0]
    index = torch.arange(n)
    pool = index // E if granularity == "layer" else (index // (E * P)) * P + index % P
    m = int(pool.max()) + 1
    pooled_costs = torch.zeros(m, costs.shape[1], dtype=costs.dtype).index_add_(0, pool, costs)
    pooled_sizes = torch.zeros(m, dtype=sizes.dtype).index_add_(0, pool, sizes)
    forbidden = torch.zeros(m, allowed.shape[1]).index_add_(0, pool, (~allowed).float())
    first = torch.full((m,), n).scatter_reduce_(0, pool, index, reduce="amin")
    choice = solve_allocation(pooled_costs, pooled_sizes, bit_list, groups[first], budgets, forbidden == 0)
    return choice[pool]


def _importance(stats: ExpertStats, config: AllocationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(frequency, mean routing weight) per [layer, expert], mixed over modalities."""
    unknown = set(config.modality_weights) - set(MODALITIES)
    if unknown:
        raise RecipeError(f"allocation.modality_weights: unknown modalities {sorted(unknown)}; use {list(MODALITIES)}")
    lam = torch.tensor([config.modality_weights.get(m, 0.0) for m in stats.modalities], dtype=torch.float64)
    present = (stats.total_tokens.sum(0) > 0).double()
    lam = lam * present
    if lam.sum() <= 0:
        raise RecipeError(
            "allocation.modality_weights give zero weight to every modality present in the calibration data."
        )
    freq = stats.tokens / stats.total_tokens[:, None, :].clamp(min=1)
    mean_weight = stats.weight_sum / stats.tokens.clamp(min=1)
    return (freq * lam).sum(-1) / lam.sum(), (mean_weight * lam).sum(-1) / lam.sum()


def allocate(
    stats: ExpertStats, config: AllocationConfig, integer_format: QuantFormat | None = None
) -> CompressionPlan:
    """A format per expert (or projection) from the stats' error profile under `config`'s budget.
    The candidates are the formats the profile measured; `integer_format` (default: the profiled integer
    format) sets the scale/zero overhead that `avg_bits` excludes."""
    config.validate()
    L, E, P = len(stats.layers), stats.num_experts, len(PROJECTIONS)
    if config.method == "uniform":
        raise RecipeError("allocation.method uniform needs no allocation: use quantization.bits.")
    if stats.quant_error is None:
        raise RecipeError("these expert statistics have no error profile: run `moecompress plan` (it measures one).")
    profiled_formats = [QuantFormat.from_dict(f) for f in stats.candidate_formats]
    profiled = [f.key for f in profiled_formats]
    missing = set(config.profile_keys) - set(profiled)
    if missing:
        raise RecipeError(
            f"the error profile has formats {profiled} but the allocation needs {sorted(missing, key=_key_order)}; "
            "re-run the profile."
        )
    cand = set(config.candidates)
    per_expert = config.granularity in ("expert", "layer")
    names = [
        f"layers.{layer}.experts.{e}" + ("" if per_expert else f".{p}")
        for layer in stats.layers
        for e in range(E)
        for p in ([None] if per_expert else PROJECTIONS)
    ]
    n = len(names)
    items_per_layer = E if per_expert else E * P

    keys = config.profile_keys
    columns = [profiled.index(k) for k in keys]
    formats = [profiled_formats[c] for c in columns]
    if integer_format is None:
        integer_format = next((f for f in profiled_formats if f.key == f.bits), IntFormat(4))
    bit_list = [storage_bits(f) for f in formats]
    err = stats.quant_error[:, :, columns, :] / stats.profile_tokens[:, :, None, None].clamp(min=1)
    err = err[..., 3] if per_expert else err[..., :3].permute(0, 1, 3, 2)  # [L,E,C] or [L,E,P,C]
    err = err.reshape(n, len(keys))
    freq, weight = _importance(stats, config)
    importance = (freq.clamp(min=0) ** config.alpha * weight.clamp(min=0) ** config.beta).reshape(L * E)
    importance = importance.repeat_interleave(1 if per_expert else P)
    costs = importance[:, None] * err.clamp(min=0) ** config.alpha

    allowed = torch.tensor([[k in cand for k in keys]] * n)
    for pattern, b in config.fixed.items():
        hits = [i for i, name in enumerate(names) if re.search(pattern, name)]
        if not hits:
            raise RecipeError(f"allocation.fixed pattern '{pattern}' matches no expert (names look like {names[0]}).")
        allowed[hits] = torch.tensor([k == b for k in keys])

    sizes = torch.ones(n, dtype=torch.float64)  # routed experts / projections of one size, unless blocks differ
    if stats.expert_params is not None:
        per_block = torch.tensor(stats.expert_params, dtype=torch.float64)
        sizes = (per_block / per_block.mean()).repeat_interleave(items_per_layer)
    if config.scope == "layer":
        groups = torch.arange(n) // items_per_layer
    else:
        groups = torch.zeros(n, dtype=torch.long)
    budget_bits = storage_bits(integer_format) - integer_format.code_bits + config.avg_bits
    budgets = {int(g): budget_bits * float(sizes[groups == g].sum()) for g in groups.unique()}
    cheapest = torch.where(allowed, torch.tensor(bit_list, dtype=torch.float64), float("inf")).min(dim=1).values
    for g, budget in budgets.items():
        smallest = float((cheapest * sizes)[groups == g].sum() / sizes[groups == g].sum())
        if budget < float(sizes[groups == g].sum()) * smallest - 1e-9:
            raise BudgetError(
                f"allocation.avg_bits {config.avg_bits:g} is infeasible for {'layer ' + str(stats.layers[g]) if config.scope == 'layer' else 'the model'}: "
                f"the smallest feasible budget is {smallest - budget_bits + config.avg_bits:.4g} with candidates "
                f"{[f.name for f in formats]} and the fixed experts. Raise avg_bits or add a smaller candidate."
            )
    if config.granularity in POOLED:
        choice = _solve_pooled(config.granularity, E, P, costs, sizes, bit_list, groups, budgets, allowed)
    elif config.method == "lp":
        choice = solve_allocation(costs, sizes, bit_list, groups, budgets, allowed)
    else:
        if config.fixed:
            raise RecipeError(f"allocation.fixed is only honoured by method lp, not '{config.method}'.")
        if config.scope != "global":
            raise BudgetError(f"the {config.method} baseline spreads one global budget; set allocation.scope: global.")
        usable = [j for j, k in enumerate(keys) if k in cand]
        usable_bits = [bit_list[j] for j in usable]
        if config.method == "random":
            picked = random_allocation(sizes, usable_bits, budgets[0], config.seed)
        else:
            order = freq.reshape(-1).repeat_interleave(1 if per_expert else P)
            picked = ranked_allocation(order, sizes, usable_bits, budgets[0])
        choice = torch.tensor(usable)[picked]
    chosen = choice.reshape(L, E, -1)
    objective = float(costs.gather(1, choice[:, None]).sum())
    return CompressionPlan(
        list(stats.layers),
        chosen.expand(L, E, P).clone() if per_expert else chosen,
        formats,
        config.method,
        {
            "avg_bits_budget": config.avg_bits,
            "scope": config.scope,
            "granularity": config.granularity,
            "objective": objective,
            "candidates": [f.name for f in formats],
        },
    )
