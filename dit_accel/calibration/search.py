"""Step 2 of the schedule search: choose the computed steps.

A dynamic programme over the steps picks the set of computed steps with the smallest total cost under the
compute budget and the guardrails (warm-up and final steps computed, at most ``max_consecutive_reuse`` reused
steps in a row) -- exact, not greedy. A share of the budget can instead buy *selective* steps (ProCache): the
reused steps with the largest cost recompute their last ``selective_blocks`` blocks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from dit_accel.calibration.measure import CostFn, ReuseCosts
from dit_accel.calibration.settings import SearchSettings

logger = logging.getLogger("dit_accel")


def search_schedule(
    cost: CostFn,
    num_steps: int,
    num_compute: int,
    *,
    forced: set[int],
    max_consecutive_reuse: int,
) -> tuple[list[int], float]:
    """Exact DP over the computed steps: exactly ``num_compute`` of them (step 0 and ``forced``
    included), at most ``max_consecutive_reuse`` reused steps in a row, minimising the summed
    ``cost(prev, last, u)`` of the reused steps ``u``. The state is the pair of the last two computed
    steps, so forecast costs that depend on both are exact.

    Returns the 0/1 schedule and its cost. Raises ``ValueError`` when no schedule meets the guardrails.
    """
    n = num_steps
    forced = set(forced) | {0}
    gap = max_consecutive_reuse + 1
    inf = math.inf
    # best[(prev, last)][k] = (cost, back pointer prev-of-prev)
    best: dict[tuple[int, int], dict[int, tuple[float, int]]] = {(-1, 0): {1: (0.0, -2)}}
    by_last: dict[int, list[tuple[int, int]]] = {0: [(-1, 0)]}

    def seg(prev: int, last: int, end: int) -> float:
        total = 0.0
        for u in range(last + 1, end):
            c = None if u in forced else cost(prev, last, u)
            if c is None:
                return inf
            total += c
        return total

    for last in range(n):
        for state in by_last.get(last, []):
            prev = state[0]
            for t in range(last + 1, min(n, last + gap + 1)):
                c = seg(prev, last, t)
                if c == inf:
                    continue
                nxt = (last, t)
                for k, (value, _) in best[state].items():
                    if k + 1 > num_compute:
                        continue
                    table = best.setdefault(nxt, {})
                    if nxt not in by_last.get(t, []):
                        by_last.setdefault(t, []).append(nxt)
                    if value + c < table.get(k + 1, (inf, 0))[0]:
                        table[k + 1] = (value + c, prev)
    final: tuple[int, int] | None = None
    final_cost = inf
    for state, table in best.items():
        if num_compute not in table or n - 1 - state[1] > max_consecutive_reuse:
            continue
        c = table[num_compute][0] + seg(state[0], state[1], n)
        if c < final_cost:
            final, final_cost = state, c
    if final is None:
        raise ValueError(
            f"no schedule with {num_compute} computed steps of {n} meets the guardrails "
            f"(forced steps {sorted(forced)}, max_consecutive_reuse={max_consecutive_reuse}); raise the budget"
        )
    schedule = [0] * n
    state, k = final, num_compute
    while state[1] >= 0 and k >= 1:
        schedule[state[1]] = 1
        back = best[state][k][1]
        state, k = (back, state[0]), k - 1
    return schedule, final_cost


def plan_budget(
    num_steps: int,
    num_blocks: int,
    budget: float,
    *,
    always_blocks: int,
    selective_blocks: int,
    selective_share: float,
    selective_tokens: float = 0.0,
) -> tuple[int, int]:
    """``(full steps, selective steps)`` whose block evaluations fit ``budget * num_steps * num_blocks``.

    ``always_blocks`` (head + tail) run on every step; a selective step runs ``selective_blocks`` more,
    plus the rest of the span on a ``selective_tokens`` share of the tokens (counted as that share of a
    block evaluation).
    """
    total = budget * num_steps * num_blocks
    per_full = num_blocks - always_blocks
    room = total - num_steps * always_blocks
    per_selective = selective_cost(num_blocks, always_blocks, selective_blocks, selective_tokens)
    k_max = int(math.floor(room / per_full + 1e-9))
    k = k_max if selective_share <= 0 or per_selective <= 0 else int(math.floor(k_max * (1.0 - selective_share) + 1e-9))
    k = max(1, min(num_steps, k))
    m = 0
    if per_selective > 0 and selective_share > 0:
        m = int(math.floor((room - k * per_full) / per_selective + 1e-9))
        m = max(0, min(num_steps - k, m))
    return k, m


def selective_cost(num_blocks: int, always_blocks: int, selective_blocks: int, selective_tokens: float) -> float:
    """Block evaluations a selective step adds to the always-run blocks: the deep blocks in full and
    the rest of the span on the ``selective_tokens`` share of the tokens."""
    return selective_blocks + selective_tokens * (num_blocks - always_blocks - selective_blocks)


def with_selective(schedule: list[int], cost: CostFn, m: int) -> tuple[list[int], dict[int, float]]:
    """Mark the ``m`` reused steps with the largest expected cost as selective (2)."""
    out = list(schedule)
    reuse_cost: dict[int, float] = {}
    prev, last = -1, 0
    for t, v in enumerate(out):
        if v:
            prev, last = (last if t else -1), t
        else:
            reuse_cost[t] = cost(prev, last, t) or 0.0
    for t in sorted(reuse_cost, key=lambda u: -reuse_cost[u])[:m]:
        out[t] = 2
    return out, reuse_cost


def uniform_schedule(num_steps: int, num_compute: int, forced: set[int], warmup_steps: int) -> list[int]:
    """``num_compute`` computed steps: step 0 and ``forced``, the others evenly spaced after the warm-up
    (equal reuse gaps up to rounding)."""
    base = set(forced) | {0}
    r = max(0, num_compute - len(base))
    start = max(warmup_steps, 1) - 1
    end = max([f for f in forced if f > start], default=num_steps)
    free = [t for t in range(start + 1, end) if t not in base]
    chosen = {free[min(len(free) - 1, int((j + 1) * (len(free) + 1) / (r + 1)) - 1)] for j in range(r)} if free and r else set()
    return [1 if (t in base or t in chosen) else 0 for t in range(num_steps)]


@dataclass
class SearchResult:
    """The schedules the search found and the budget they spend."""

    found: list[tuple[list[int], float, int]]
    """Per searched forecast order: ``(0/1 schedule, expected cost, order)``."""
    num_compute: int
    """Computed steps of each schedule (the budget's, or more when the guardrails need them)."""
    num_selective: int
    """Reused steps the rest of the budget turns into selective ones."""
    per_selective: float
    """Block evaluations a selective step adds to the always-run blocks."""

    @property
    def best(self) -> tuple[list[int], float, int]:
        """The found schedule with the smallest expected cost."""
        return min(self.found, key=lambda f: f[1])

    @property
    def expected_by_order(self) -> dict[int, float]:
        """Expected cost of the best schedule per forecast order."""
        return {o: c for _, c, o in self.found}


def search(costs: ReuseCosts, settings: SearchSettings, num_blocks: int) -> SearchResult:
    """The exact search of the computed steps under the budget and the guardrails, per forecast order."""
    s = settings
    forced = s.forced
    k_budget, _ = plan_budget(
        s.num_steps, num_blocks, s.budget, always_blocks=s.always_blocks, selective_blocks=s.selective_blocks,
        selective_share=s.selective_share, selective_tokens=s.selective_tokens,
    )
    k = max(k_budget, len(forced | {0}))
    orders = s.orders
    while True:  # the guardrails may need more computed steps than the budget buys
        try:
            found = [
                search_schedule(costs.cost_fn(o), s.num_steps, k, forced=forced, max_consecutive_reuse=s.max_consecutive_reuse) + (o,)
                for o in orders
            ]
            break
        except ValueError:
            if k >= s.num_steps:
                raise
            k += 1
    if k > k_budget:
        logger.warning("calibrate: the guardrails need %d computed steps, more than the budget's %d", k, k_budget)
    room = s.budget * s.num_steps * num_blocks - k * num_blocks - (s.num_steps - k) * s.always_blocks
    m = 0
    per_selective = selective_cost(num_blocks, s.always_blocks, s.selective_blocks, s.selective_tokens)
    if s.selective_share > 0 and per_selective > 0:
        m = max(0, min(s.num_steps - k, int(math.floor(room / per_selective + 1e-9))))
    return SearchResult(found, k, m, per_selective)
