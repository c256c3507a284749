"""The knapsack against brute force, and its refusals."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.sensitivity.knapsack import choose

option = st.tuples(st.integers(1, 60), st.floats(-1.0, 10.0, allow_nan=False))
groups = st.lists(st.lists(option, min_size=1, max_size=4), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(groups=groups, slack=st.floats(0.0, 1.0))
def test_the_choice_fits_and_no_other_fitting_choice_is_better(groups, slack):
    least = sum(min(c for c, _ in g) for g in groups)
    most = sum(max(c for c, _ in g) for g in groups)
    budget = least + slack * (most - least)
    picks = choose(groups, budget, units=4000)
    assert sum(g[i][0] for g, i in zip(groups, picks, strict=True)) <= budget
    value = sum(g[i][1] for g, i in zip(groups, picks, strict=True))
    fitting = [sum(g[i][1] for g, i in zip(groups, c, strict=True))
               for c in itertools.product(*(range(len(g)) for g in groups))
               if sum(g[i][0] for g, i in zip(groups, c, strict=True)) <= budget]  # fmt: skip
    # exact up to the resolution of 4000 units (costs here are whole numbers, so it is exact
    # whenever a unit is finer than one)
    if budget / 4000 < 0.5:
        assert value <= min(fitting) + 1e-9


def test_an_exact_fit_is_found_and_a_budget_below_the_cheapest_is_refused():
    groups = [[(4.5, 1.0), (8.5, 0.0)]] * 7  # uniform 4 bits is exactly the budget
    assert choose(groups, budget=7 * 4.5) == [0] * 7
    with pytest.raises(ValueError, match=r"budget \(10\) is below the smallest size .* \(31.5\)"):
        choose(groups, budget=10)
