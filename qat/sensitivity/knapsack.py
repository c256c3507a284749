"""One option per group, least total predicted loss, total size within a budget: the
multiple-choice knapsack, solved by dynamic programming over the budget cut into units.

Costs are rounded to the nearest unit, so a choice that fits exactly (the uniform recipe at its
own size) is still found. Rounding moves a total by at most half a unit per group, so the
program starts with that much room over the budget and shrinks the capacity a unit at a time
until the real total of its choice fits: what is returned always fits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Options = Sequence[Sequence[tuple[float, float]]]


def _solve(options: Options, unit: float, cap: int) -> list[int] | None:
    best = np.zeros(cap + 1)  # best[c]: least value with total cost <= c units
    picks = []
    for group in options:
        nxt = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int64)
        for i, (cost, value) in enumerate(group):
            k = round(cost / unit)
            if k > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[k:] = best[: cap + 1 - k] + value
            better = cand < nxt
            nxt[better], pick[better] = cand[better], i
        best = nxt
        picks.append(pick)
    if not np.isfinite(best[cap]):
        return None
    out, c = [], cap
    for group, pick in zip(reversed(options), reversed(picks), strict=True):
        i = int(pick[c])
        out.append(i)
        c -= round(group[i][0] / unit)
    return out[::-1]


def choose(options: Options, budget: float, units: int = 4000) -> list[int]:
    """For each group the index of its chosen `(cost, value)` option: the least total
    value whose total cost is at most `budget`. `ValueError` if even the cheapest options
    exceed it.

    Example:
        >>> # two layers, each 4 bits (cost 4, loss 1.0) or 8 bits (cost 8, loss 0.0)
        >>> choose([[(4, 1.0), (8, 0.0)], [(4, 0.2), (8, 0.0)]], budget=12)
        [1, 0]
    """
    least = sum(min(c for c, _ in group) for group in options)
    if least > budget:
        raise ValueError(f"the budget ({budget:g}) is below the smallest size the candidates "
                         f"allow ({least:g}): raise the budget or add fewer bits to the "
                         "candidates")  # fmt: skip
    unit = budget / units
    slack = len(options)  # rounding moves a total by at most half a unit per group
    for cap in range(units + slack, max(units - slack, 0) - 2, -1):
        picks = _solve(options, unit, cap)
        if picks is None:
            continue
        if sum(g[i][0] for g, i in zip(options, picks, strict=True)) <= budget * (1 + 1e-12):
            return picks
    raise AssertionError("unreachable: the cheapest options fit the budget")
