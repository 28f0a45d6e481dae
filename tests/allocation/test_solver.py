import itertools

import pytest
import torch

from moecompress.allocation.solver import greedy_allocation, random_allocation, ranked_allocation, solve_allocation
from moecompress.errors import BudgetError

BITS = [2.0, 3.0, 4.0]


def random_problem(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    importance = torch.rand(n, 1, generator=g, dtype=torch.float64) ** 2
    error = torch.rand(n, 1, generator=g, dtype=torch.float64) * torch.tensor([[16.0, 4.0, 1.0]], dtype=torch.float64)
    sizes = torch.randint(1, 4, (n,), generator=g).double()
    return importance * error, sizes


def brute_force(costs, sizes, budget):
    best, best_choice = float("inf"), None
    for choice in itertools.product(range(3), repeat=len(sizes)):
        c = torch.tensor(choice)
        if float((sizes * torch.tensor(BITS, dtype=torch.float64)[c]).sum()) <= budget + 1e-9:
            cost = float(costs.gather(1, c[:, None]).sum())
            if cost < best:
                best, best_choice = cost, c
    return best, best_choice


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("avg_bits", [2.3, 2.5, 3.0, 3.6])
def test_integer_program_matches_exhaustive_search(seed, avg_bits):
    costs, sizes = random_problem(seed=seed)
    budget = avg_bits * float(sizes.sum())
    choice = solve_allocation(costs, sizes, BITS, torch.zeros(8, dtype=torch.long), {0: budget}, gap=0)
    used = float((sizes * torch.tensor(BITS, dtype=torch.float64)[choice]).sum())
    best, _ = brute_force(costs, sizes, budget)
    assert used <= budget + 1e-9
    assert float(costs.gather(1, choice[:, None]).sum()) == pytest.approx(best, rel=1e-6)


def test_per_group_budgets_are_each_respected():
    costs, sizes = random_problem(n=12)
    groups = torch.arange(12) // 4
    budgets = {g: 2.5 * float(sizes[groups == g].sum()) for g in range(3)}
    choice = solve_allocation(costs, sizes, BITS, groups, budgets)
    for g in range(3):
        used = (sizes * torch.tensor(BITS, dtype=torch.float64)[choice])[groups == g].sum()
        assert float(used) <= budgets[g] + 1e-9


def test_greedy_warm_start_is_feasible_and_near_optimal():
    costs, sizes = random_problem(n=10, seed=3)
    budget = 2.7 * float(sizes.sum())
    greedy = greedy_allocation(costs, sizes, BITS, torch.ones(10, 3, dtype=torch.bool), budget)
    assert float((sizes * torch.tensor(BITS, dtype=torch.float64)[greedy]).sum()) <= budget
    best, _ = brute_force(costs, sizes, budget)
    assert float(costs.gather(1, greedy[:, None]).sum()) <= 2 * best


def test_infeasible_budget_names_the_smallest_feasible_one():
    costs, sizes = random_problem()
    with pytest.raises(BudgetError, match="smallest feasible budget is 2 bits/param"):
        solve_allocation(costs, sizes, BITS, torch.zeros(8, dtype=torch.long), {0: 1.5 * float(sizes.sum())})


def test_fixed_items_keep_their_bits():
    costs, sizes = random_problem()
    allowed = torch.ones(8, 3, dtype=torch.bool)
    allowed[0] = torch.tensor([False, False, True])
    choice = solve_allocation(
        costs, sizes, BITS, torch.zeros(8, dtype=torch.long), {0: 2.6 * float(sizes.sum())}, allowed
    )
    assert choice[0] == 2


def test_baselines_split_between_the_bracketing_candidates():
    sizes = torch.ones(10, dtype=torch.float64)
    rand = random_allocation(sizes, BITS, 2.5 * 10, seed=1)
    assert sorted(rand.tolist()) == [0] * 5 + [1] * 5
    ranked = ranked_allocation(torch.arange(10.0), sizes, BITS, 2.5 * 10)
    assert ranked.tolist() == [0] * 5 + [1] * 5
