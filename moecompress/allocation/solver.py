"""Multiple-choice knapsack by integer programming (PuLP + CBC), and the uniform baselines.

Items (experts or expert projections) each take exactly one candidate; item i with candidate c costs
`costs[i, c]` and uses `sizes[i] * bits[c]` bits; each budget group g (a layer, or everything) must
stay within `budgets[g]` bits."""

from __future__ import annotations

import random

import pulp
import torch

from ..errors import BudgetError


def feasible_range(sizes: torch.Tensor, bits: list[float], allowed: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) total bits reachable with each item on an allowed candidate."""
    b = torch.tensor(bits, dtype=torch.float64)
    low = (sizes * torch.where(allowed, b, float("inf")).min(dim=1).values).sum()
    high = (sizes * torch.where(allowed, b, float("-inf")).max(dim=1).values).sum()
    return float(low), float(high)


def solve_allocation(
    costs: torch.Tensor,
    sizes: torch.Tensor,
    bits: list[float],
    groups: torch.Tensor,
    budgets: dict[int, float],
    allowed: torch.Tensor | None = None,
    time_limit: float = 60.0,
    gap: float = 1e-3,
) -> torch.Tensor:
    """Candidate index per item minimising the total cost under the per-group bit budgets. Groups share
    no item, so each is its own integer program (much faster for CBC than one program with many budgets)."""
    n, c = costs.shape
    sizes = sizes.to(torch.float64)
    allowed = torch.ones(n, c, dtype=torch.bool) if allowed is None else allowed.clone()
    allowed &= ~_dominated(torch.where(allowed, costs.double(), float("inf")), bits)
    choice = torch.full((n,), -1, dtype=torch.long)
    for g, budget in budgets.items():
        members = torch.where(groups == g)[0]
        low, _ = feasible_range(sizes[members], bits, allowed[members])
        if low > budget * (1 + 1e-9):
            raise BudgetError(
                f"a budget of {budget / float(sizes[members].sum()):.4g} bits/param is infeasible for budget group {g}: "
                f"the smallest feasible budget is {low / float(sizes[members].sum()):.4g} bits/param with candidates "
                f"{bits} and the fixed modules. Raise the budget or add a lower-bit candidate."
            )
        choice[members] = _solve_one(costs[members], sizes[members], bits, budget, allowed[members], time_limit, gap)
    return choice


def _solve_one(costs, sizes, bits, budget, allowed, time_limit, gap) -> torch.Tensor:
    start = greedy_allocation(costs, sizes, bits, allowed, budget)
    unit = float(sizes.mean())
    scale = float(costs[allowed].abs().max()) or 1.0
    problem = pulp.LpProblem("moe_bit_allocation", pulp.LpMinimize)
    pairs = torch.nonzero(allowed).tolist()
    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for i, j in pairs}
    problem.setObjective(pulp.LpAffineExpression([(x[i, j], float(costs[i, j]) / scale) for i, j in pairs]))
    by_item: dict[int, list] = {}
    for i, j in pairs:
        by_item.setdefault(i, []).append((x[i, j], 1.0))
        x[i, j].setInitialValue(1 if start[i] == j else 0)
    for i, terms in by_item.items():
        problem.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), pulp.LpConstraintEQ, f"one_{i}", 1))
    size_terms = [(x[i, j], float(sizes[i]) / unit * bits[j]) for i, j in pairs]
    problem.addConstraint(
        pulp.LpConstraint(pulp.LpAffineExpression(size_terms), pulp.LpConstraintLE, "budget", budget / unit)
    )
    status = problem.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, warmStart=True))
    if problem.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        raise BudgetError(f"the bit-allocation program has no solution (CBC status {pulp.LpStatus[status]}).")
    choice = start.clone()
    for (i, j), var in x.items():
        if var.value() is not None and var.value() > 0.5:
            choice[i] = j
    return choice


def greedy_allocation(
    costs: torch.Tensor, sizes: torch.Tensor, bits: list[float], allowed: torch.Tensor, budget: float
) -> torch.Tensor:
    """LP-relaxation greedy for the multiple-choice knapsack: every item starts at its cheapest allowed
    candidate; upgrades along each item's lower convex hull are taken by cost saved per extra bit while the
    budget allows. A feasible warm start within one fractional item of the LP optimum."""
    n = costs.shape[0]
    choice = torch.empty(n, dtype=torch.long)
    steps = []
    for i in range(n):
        options = sorted((bits[j], float(costs[i, j]), j) for j in range(len(bits)) if allowed[i, j])
        hull = [options[0]]
        for option in options[1:]:
            if option[1] >= hull[-1][1]:
                continue
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], option):
                hull.pop()
            hull.append(option)
        choice[i] = hull[0][2]
        steps += [(_slope(a, b), i, a[2], b[2], (b[0] - a[0]) * float(sizes[i])) for a, b in zip(hull, hull[1:])]
    used = sum(bits[int(choice[i])] * float(sizes[i]) for i in range(n))
    for _, i, src, dst, extra in sorted(steps, key=lambda s: -s[0]):
        if choice[i] == src and used + extra <= budget:
            choice[i], used = dst, used + extra
    return choice


def _slope(a: tuple, b: tuple) -> float:
    """Cost saved per extra bit going from candidate a to b."""
    return (a[1] - b[1]) / (b[0] - a[0])


def _dominated(costs: torch.Tensor, bits: list[float]) -> torch.Tensor:
    """Candidates another candidate beats on both cost and bits (never in an optimal solution)."""
    b = torch.tensor(bits, dtype=costs.dtype)
    cheaper_or_equal = (b[None, :, None] <= b[None, None, :]) & (costs[:, :, None] <= costs[:, None, :])
    strictly = (b[None, :, None] < b[None, None, :]) | (costs[:, :, None] < costs[:, None, :])
    return (cheaper_or_equal & strictly).any(dim=1)


def bracket_allocation(order: list[int], sizes: torch.Tensor, bits: list[float], budget: float) -> torch.Tensor:
    """Baseline: the two candidates around the average budget; items earliest in `order` get the higher one
    until the budget is used (sizes may differ, so the split is by bits, not by count)."""
    target = budget / float(sizes.sum())
    ranked = sorted(range(len(bits)), key=lambda j: bits[j])
    lower = max((j for j in ranked if bits[j] <= target), key=lambda j: bits[j], default=ranked[0])
    upper = min((j for j in ranked if bits[j] >= target), key=lambda j: bits[j], default=ranked[-1])
    choice = torch.full((len(sizes),), lower, dtype=torch.long)
    used = float(sizes.sum()) * bits[lower]
    for i in order:
        extra = float(sizes[i]) * (bits[upper] - bits[lower])
        if used + extra > budget * (1 + 1e-9):
            break
        choice[i], used = upper, used + extra
    return choice


def random_allocation(sizes: torch.Tensor, bits: list[float], budget: float, seed: int = 0) -> torch.Tensor:
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    return bracket_allocation(order, sizes, bits, budget)


def ranked_allocation(score: torch.Tensor, sizes: torch.Tensor, bits: list[float], budget: float) -> torch.Tensor:
    """Baseline: items with the highest `score` (e.g. routing frequency) get the higher candidate."""
    return bracket_allocation(torch.argsort(score, descending=True).tolist(), sizes, bits, budget)
