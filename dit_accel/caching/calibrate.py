"""Offline schedule search (``dit-accel calibrate``): measure, then choose which steps to compute.

1. *Measure.* Dense generations on calibration prompts with a recorder on the blocks: at every step
   and guidance branch the residual of the cacheable span ``R_t`` (span output minus span input) is
   compared with the residuals of the previous ``max_consecutive_reuse + 1`` steps. The cost of
   reusing step ``s``'s residual at step ``t`` is::

       c(s, t) = dt_t * mean|R_t - R_s| / mean_t(mean|R_t|)

   (``dt_t`` the sampler's sigma step, so errors count as much as they move the latent), averaged
   over prompts, branches and transformers.
2. *Search.* A dynamic programme over the steps picks the set of computed steps with the smallest
   total cost under the compute budget and the guardrails (warm-up and final steps computed, at most
   ``max_consecutive_reuse`` reused steps in a row) -- exact, not greedy. A share of the budget can
   instead buy *selective* steps (ProCache): the reused steps with the largest cost recompute their
   last ``selective_blocks`` blocks.
3. *Refine* (optional, ``refine > 0``): ProCache's proxy evaluation -- the DP's schedules, the evenly
   spaced schedule of the same count and hill-climbing moves of single computed steps are run for real on the calibration prompts and the
   one whose final output is closest to dense is kept; every measured candidate is recorded.
4. *Write* a schedule file (``dit_accel.caching.schedule_file``) that ``fixed`` and ``procache`` load.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dit_accel.caching.config import CacheConfig, FixedCacheConfig
from dit_accel.caching.hooks import CacheController, find_blocks, install_controller
from dit_accel.caching.schedule_file import SCHEDULE_FORMAT, SCHEDULE_VERSION, save_schedule
from dit_accel.caching.schedulers import BranchState, CacheScheduler, Streams

logger = logging.getLogger("dit_accel")


class _ReuseErrorRecorder(CacheScheduler):
    """Computes every step; measures what reusing (or forecasting) earlier residuals would cost.

    At step ``t`` with span residual ``R_t`` and the residuals of the previous steps in a window:
    ``e0(s, t) = mean|R_t - R_s|`` for ``t - s <= gap`` and, for order 1, the error of the linear
    forecast from two computed steps ``s0 < s1``: ``e1(s0, s1, t) = mean|R_t - F|`` with
    ``F = R_s1 + (R_s1 - R_s0) (t - s1) / (s1 - s0)``, for ``s1 - s0 <= gap`` and ``t - s1 <= gap``.
    """

    name = "_recorder"
    config_class = CacheConfig

    def __init__(self, config: CacheConfig, num_blocks: int, gap: int, order: int, token_stride: int,
                 sink: "_Measurements") -> None:
        super().__init__(config, num_blocks)
        self.gap = gap
        self.forecast_order = order
        self.token_stride = token_stride
        self.sink = sink
        self.history: dict[int, deque] = {}

    def guardrail(self, info, state) -> str | None:
        """Never reuse."""
        return "calibration"

    def decide(self, info, state):  # pragma: no cover - guardrail always forces compute
        raise AssertionError("unreachable")

    def store(self, state: BranchState, end: int, residual: Streams, step: int) -> None:
        """Measure against the window of previous residuals of this branch; keep nothing in ``state``."""
        r = residual[0].detach()
        if self.token_stride > 1 and r.dim() >= 2:
            r = r[:, :: self.token_stride]
        r = r.float()
        window = 2 * self.gap if self.forecast_order else self.gap
        hist = self.history.setdefault(id(state), deque(maxlen=window))
        if hist and hist[-1][0] >= step:
            hist.clear()  # a new generation (state objects are recreated per call; ids may repeat)
        past = {s: prev for s, prev in hist}
        keys: list[tuple[int, ...]] = []
        values = [r.abs().mean()]
        for s1 in range(step - self.gap, step):
            if s1 not in past:
                continue
            keys.append((s1,))
            values.append((r - past[s1]).abs().mean())
            if self.forecast_order:
                for s0 in range(s1 - self.gap, s1):
                    if s0 in past:
                        forecast = past[s1] + (past[s1] - past[s0]) * ((step - s1) / (s1 - s0))
                        keys.append((s0, s1))
                        values.append((r - forecast).abs().mean())
        host = torch.stack(values).tolist()  # one host sync per step and branch
        self.sink.add(step, host[0], dict(zip(keys, host[1:])))
        hist.append((step, r))


class _Measurements:
    """Residual magnitudes and reuse/forecast errors, listed over prompts, branches and transformers."""

    def __init__(self) -> None:
        self.scale: dict[int, list[float]] = {}
        self.err: dict[tuple[int, ...], list[float]] = {}

    def add(self, step: int, scale: float, errors: dict[tuple[int, ...], float]) -> None:
        self.scale.setdefault(step, []).append(scale)
        for key, v in errors.items():
            self.err.setdefault(key + (step,), []).append(v)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


CostFn = Callable[[int, int, int], "float | None"]
"""``cost(prev, last, u)``: cost of step ``u`` reused after computed steps ``prev < last``
(``prev = -1`` when ``last`` is the first computed step); ``None`` when unknown (not allowed)."""


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


def _sigma_steps(pipe: Any, num_steps: int) -> list[float]:
    sigmas = getattr(getattr(pipe, "scheduler", None), "sigmas", None)
    if sigmas is None or len(sigmas) < num_steps + 1:
        return [1.0 / num_steps] * num_steps
    s = [float(v) for v in sigmas]
    return [abs(s[i] - s[i + 1]) for i in range(num_steps)]


def _sample_of(result: Any) -> torch.Tensor:
    """The generated tensor of a pipeline result (latents with ``output_type="latent"``)."""
    if isinstance(result, tuple):
        return result[0]
    for attr in ("frames", "images", "videos"):
        value = getattr(result, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find the output tensor in {type(result).__name__}; pass output_type='latent'")


def _with_selective(schedule: list[int], cost: CostFn, m: int) -> tuple[list[int], dict[int, float]]:
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


def _valid(schedule: list[int], forced: set[int], cap: int) -> bool:
    if not schedule[0] or any(not schedule[f] for f in forced):
        return False
    run_len = 0
    for v in schedule:
        run_len = 0 if v == 1 else run_len + 1
        if run_len > cap:
            return False
    return True


def _mutations(schedule: list[int], forced: set[int], cap: int, rng: random.Random, count: int) -> list[list[int]]:
    """Up to ``count`` distinct valid schedules with one computed step moved by 1 or 2 steps."""
    base = [1 if v == 1 else 0 for v in schedule]
    movable = [t for t, v in enumerate(base) if v and t not in forced and t != 0]
    moves = [(t, d) for t in movable for d in (-2, -1, 1, 2) if 0 < t + d < len(base) and not base[t + d]]
    rng.shuffle(moves)
    out: list[list[int]] = []
    for t, d in moves:
        cand = list(base)
        cand[t], cand[t + d] = 0, 1
        if _valid(cand, forced, cap) and cand not in out:
            out.append(cand)
        if len(out) >= count:
            break
    return out


def calibrate(
    pipe: Any,
    prompts: Sequence[str | dict[str, Any]],
    *,
    num_steps: int,
    budget: float,
    out: str | Path | None = None,
    model_id: str = "unknown",
    warmup_steps: int = 2,
    final_steps: int = 1,
    max_consecutive_reuse: int = 3,
    head_blocks: int = 0,
    tail_blocks: int = 0,
    selective_blocks: int = 1,
    selective_share: float = 0.0,
    selective_tokens: float = 0.0,
    forecast_order: int | str = "auto",
    target: str = "span",
    refine: int = 0,
    token_stride: int = 1,
    seed: int = 0,
    call_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Search a cache schedule for ``pipe`` at ``num_steps`` steps and compute fraction ``budget``.

    Args:
        pipe: a diffusers pipeline (dit-accel's context is attached for the run if absent).
        prompts: calibration prompts; a dict is passed to the pipeline as keyword arguments instead
            (e.g. ``prompt_embeds`` for pipelines without a text encoder).
        num_steps: denoising steps of the calibrated runs (and of the schedule).
        budget: fraction of block evaluations to spend, in (0, 1].
        out: where to write the schedule JSON (``None``: do not write).
        model_id: recorded in the file (hub id, path or ``"testbed"``).
        warmup_steps, final_steps, max_consecutive_reuse, head_blocks, tail_blocks: the guardrails and
            block split the schedule is searched under (same meaning as in :class:`CacheConfig`).
        selective_blocks: deep blocks a selective step recomputes (``procache``).
        selective_share: share of the budget spent on selective steps instead of full ones (0..1).
        selective_tokens: share of the tokens a selective step recomputes through the rest of the span
            (``procache``'s ``selective_tokens``; 0 = deep blocks only); recorded in the file.
        forecast_order: 0 searches for plain reuse, 1 for a linear (Taylor order-1) forecast from the
            last two computed steps, ``"auto"`` searches both and keeps the better; recorded in the
            file, where ``procache`` picks it up.
        target: ``"span"`` measures the span residual, ``"output"`` the output projection's result
            (the quantity a scheduler with that ``target`` reuses); no selective steps for ``"output"``.
        refine: after the DP, evaluate up to this many more candidate schedules by real cached runs
            on the calibration prompts (hill climbing: move one computed step by 1-2 steps) and keep
            the one whose final output is closest to dense (ProCache's proxy evaluation); 0 skips it.
            Every evaluated candidate's measured error is recorded in the file.
        token_stride: measure every ``token_stride``-th token only (memory).
        seed: base seed; prompt ``i`` uses ``seed + i``.
        call_kwargs: extra pipeline arguments (size, guidance, ...).

    Returns the schedule file's content (see :mod:`dit_accel.caching.schedule_file`).
    """
    from dit_accel import api
    from dit_accel.caching.config import ProCacheConfig
    from dit_accel.caching.hooks import install_cache

    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    if not (0.0 <= selective_share < 1.0):
        raise ValueError(f"selective_share must be in [0, 1), got {selective_share!r}")
    if isinstance(selective_tokens, bool) or not isinstance(selective_tokens, (int, float)) or not 0.0 <= selective_tokens <= 1.0:
        raise ValueError(f"selective_tokens must be in [0, 1], got {selective_tokens!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if forecast_order not in (0, 1, "auto") or isinstance(forecast_order, bool):
        raise ValueError(f"forecast_order must be 0, 1 or 'auto', got {forecast_order!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an int >= 0, got {refine!r}")
    measure_order = 0 if forecast_order == 0 else 1
    if target == "output":
        selective_share = 0.0
    guard = FixedCacheConfig(
        warmup_steps=warmup_steps, final_steps=final_steps, max_consecutive_reuse=max_consecutive_reuse,
        head_blocks=head_blocks, tail_blocks=tail_blocks, interval=1, target=target,
    )

    def call(i: int, prompt: str | dict[str, Any]) -> torch.Tensor:
        kwargs = dict(call_kwargs or {})
        kwargs.update(prompt if isinstance(prompt, dict) else {"prompt": prompt})
        kwargs.setdefault("output_type", "latent")
        result = pipe(num_inference_steps=num_steps, generator=torch.Generator().manual_seed(seed + i), **kwargs)
        return _sample_of(result).detach().float()

    handle = api.get_handle(pipe)
    created_handle = handle is None
    if created_handle:
        handle = api.apply(pipe)
    try:
        # 1. Measure on dense runs.
        sink = _Measurements()
        attachments = []
        num_blocks = 0
        try:
            for name, context in handle.contexts.items():
                transformer = getattr(pipe, name) if hasattr(pipe, name) else pipe
                blocks = find_blocks(transformer)
                num_blocks = len(blocks)
                recorder = _ReuseErrorRecorder(guard, len(blocks), max_consecutive_reuse + 1, measure_order, token_stride, sink)
                attachments.append(install_controller(transformer, CacheController(name, context, recorder, blocks)))
            dense = [call(i, p) for i, p in enumerate(prompts)]
            dts = _sigma_steps(pipe, num_steps)
        finally:
            for a in attachments:
                a.remove()
        if sorted(sink.scale) != list(range(num_steps)):
            raise RuntimeError(f"calibration saw steps {sorted(sink.scale)}, expected 0..{num_steps - 1}")
        scale = [_mean(sink.scale[t]) for t in range(num_steps)]
        norm = max(_mean(scale), 1e-12)
        err = {key: dts[key[-1]] * _mean(values) / norm for key, values in sink.err.items()}

        def cost_fn(order: int) -> CostFn:
            def cost(prev: int, last: int, u: int) -> float | None:
                if order and prev >= 0:
                    return err.get((prev, last, u))
                return err.get((last, u))

            return cost

        # 2. Exact search of the computed steps under the budget and the guardrails.
        forced = set(range(min(warmup_steps, num_steps))) | set(range(max(0, num_steps - final_steps), num_steps))
        k_budget, _ = plan_budget(
            num_steps, num_blocks, budget, always_blocks=head_blocks + tail_blocks,
            selective_blocks=selective_blocks, selective_share=selective_share, selective_tokens=selective_tokens,
        )
        k = max(k_budget, len(forced | {0}))
        orders = (0, 1) if forecast_order == "auto" else (int(forecast_order),)
        if selective_share > 0 and selective_blocks and target == "span":
            # Selective deep steps keep a front residual beside the whole-span one; a forecast would be a
            # third stream-size tensor per branch (the memory rule allows two), so search reuse only.
            if forecast_order not in ("auto", 0):
                raise ValueError("selective deep blocks (selective_share > 0, selective_blocks > 0) need forecast_order 0 or 'auto'")
            orders = (0,)
        while True:  # the guardrails may need more computed steps than the budget buys
            try:
                found = [
                    search_schedule(cost_fn(o), num_steps, k, forced=forced, max_consecutive_reuse=max_consecutive_reuse) + (o,)
                    for o in orders
                ]
                break
            except ValueError:
                if k >= num_steps:
                    raise
                k += 1
        if k > k_budget:
            logger.warning("calibrate: the guardrails need %d computed steps, more than the budget's %d", k, k_budget)
        always = head_blocks + tail_blocks
        room = budget * num_steps * num_blocks - k * num_blocks - (num_steps - k) * always
        m = 0
        per_selective = selective_cost(num_blocks, always, selective_blocks, selective_tokens)
        if selective_share > 0 and per_selective > 0:
            m = max(0, min(num_steps - k, int(math.floor(room / per_selective + 1e-9))))
        expected_by_order = {o: c for _, c, o in found}
        schedule01, expected, chosen_order = min(found, key=lambda f: f[1])

        # 3. Optional proxy evaluation of candidates by real cached runs (ProCache's CASS step).
        measured: list[dict[str, Any]] = []

        def evaluate(candidate01: list[int], order: int, source: str) -> float:
            full, _ = _with_selective(candidate01, cost_fn(order), m)
            config = ProCacheConfig(
                schedule=full, order=order, selective_blocks=selective_blocks if m else 0,
                selective_tokens=selective_tokens if m else 0.0, target=target,
                warmup_steps=warmup_steps, final_steps=final_steps, max_consecutive_reuse=max_consecutive_reuse,
                head_blocks=head_blocks, tail_blocks=tail_blocks,
            )
            atts = [install_cache(getattr(pipe, n) if hasattr(pipe, n) else pipe, ctx, config) for n, ctx in handle.contexts.items()]
            try:
                errors = []
                for i, p in enumerate(prompts):
                    sample = call(i, p)
                    errors.append(float(((sample - dense[i]) ** 2).mean() / (dense[i] ** 2).mean().clamp_min(1e-12)))
            finally:
                for a in atts:
                    a.remove()
            value = _mean(errors)
            measured.append({"schedule": full, "order": order, "source": source, "relative_mse": value})
            return value

        if refine > 0:
            rng = random.Random(seed)
            scores = {(tuple(s01), o): evaluate(s01, o, f"dp_order{o}") for s01, _, o in found}
            # The evenly spaced schedule with the same count is a candidate too: the DP's cost model is a
            # proxy, and on the testbed the uniform pattern sometimes wins at low budgets.
            even = uniform_schedule(num_steps, k, forced, warmup_steps)
            if _valid(even, forced, max_consecutive_reuse):
                for o in orders:
                    if (tuple(even), o) not in scores:
                        scores[(tuple(even), o)] = evaluate(even, o, f"uniform_order{o}")
            (best01, best_order), best_score = min(scores.items(), key=lambda kv: kv[1])
            best01 = list(best01)
            budget_left = refine
            while budget_left > 0:
                improved = False
                for cand in _mutations(best01, forced, max_consecutive_reuse, rng, min(budget_left, 4)):
                    if (tuple(cand), best_order) in scores:
                        continue
                    budget_left -= 1
                    score = evaluate(cand, best_order, "mutation")
                    scores[(tuple(cand), best_order)] = score
                    if score < best_score:
                        best01, best_score, improved = cand, score, True
                        break
                    if budget_left <= 0:
                        break
                if not improved:
                    break
            schedule01, chosen_order = best01, best_order
    finally:
        if created_handle:
            handle.remove()

    schedule, reuse_cost = _with_selective(schedule01, cost_fn(chosen_order), m)
    evals = sum(num_blocks if v == 1 else always + (per_selective if v == 2 else 0) for v in schedule)
    data = {
        "format": SCHEDULE_FORMAT,
        "version": SCHEDULE_VERSION,
        "model": model_id,
        "num_steps": num_steps,
        "budget": budget,
        "num_blocks": num_blocks,
        "schedule": schedule,
        "forecast_order": chosen_order,
        "target": target,
        "selective_blocks": selective_blocks if m else 0,
        "selective_tokens": selective_tokens if m else 0.0,
        "compute_fraction": evals / (num_steps * num_blocks),
        "guardrails": {
            "warmup_steps": warmup_steps, "final_steps": final_steps,
            "max_consecutive_reuse": max_consecutive_reuse, "head_blocks": head_blocks, "tail_blocks": tail_blocks,
        },
        "errors": {
            "expected_cost": expected,
            "expected_cost_by_order": {str(o): c for o, c in expected_by_order.items()},
            "reuse_cost": [reuse_cost.get(t, 0.0) for t in range(num_steps)],
            "step_change": [err.get((t - 1, t)) if t > 0 else None for t in range(num_steps)],
            "residual_scale": scale,
            "reuse_cost_pairs": {f"{key[0]}->{key[1]}": v for key, v in err.items() if len(key) == 2},
            "metric": "dt_t * mean|R_t - forecast| / mean_t mean|R_t| (cached quantity; forecast = R_s (order 0) "
                      "or the linear extrapolation from the last two computed steps (order 1); averaged over "
                      "prompts, branches and transformers)",
            "measured": measured,
            "measured_metric": "mean over calibration prompts of |out - dense|^2 / |dense|^2 (final latents)",
        },
        "prompts": [p if isinstance(p, str) else "<kwargs>" for p in prompts],
        "seed": seed,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if out is not None:
        save_schedule(data, out)
    return data


def captions_for_testbed(count: int, offset: int = 0) -> list[str]:
    """``count`` deterministic captions in the testbed grammar (varied shape, colour, motion, background)."""
    from dit_accel.testbed.captions import ATTRIBUTES

    shapes, colors = ATTRIBUTES["shape"], ATTRIBUTES["color"]
    motions, backgrounds = ATTRIBUTES["motion"], ATTRIBUTES["background"]
    out = []
    for i in range(offset, offset + count):
        motion = motions[(3 * i + 1) % len(motions)]
        phrase = motion if motion in ("bouncing", "pulsing") else f"moving {motion}"
        color = colors[(5 * i + 2) % len(colors)]
        article = "an" if color[0] in "aeiou" else "a"
        out.append(f"{article} {color} {shapes[i % len(shapes)]} {phrase} on a {backgrounds[(7 * i) % len(backgrounds)]} background")
    return out


# --- command line -------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dit-accel calibrate``."""
    parser.add_argument("--model", default="testbed", help='"testbed" (shipped) or a diffusers folder / hub id')
    parser.add_argument("--steps", type=int, required=True, help="denoising steps of the schedule")
    parser.add_argument("--budget", type=float, required=True, help="fraction of block evaluations, in (0, 1]")
    parser.add_argument("--out", type=Path, required=True, help="schedule JSON to write")
    parser.add_argument("--prompt", action="append", default=None, help="a calibration prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, default=None, help="file with one prompt per line")
    parser.add_argument("--num-prompts", type=int, default=4, help="testbed captions to use when no prompt is given")
    parser.add_argument("--height", type=int, default=None, help="pixels of the calibration runs (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="pixels of the calibration runs (default: the pipeline's)")
    parser.add_argument("--frames", type=int, default=None, help="frames of the calibration runs (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; prompt i uses SEED + i (default 0)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps always computed (default 2)")
    parser.add_argument("--final-steps", type=int, default=1, help="last steps always computed (default 1)")
    parser.add_argument("--max-consecutive-reuse", type=int, default=3, help="most steps reused in a row (default 3)")
    parser.add_argument("--head-blocks", type=int, default=0, help="first blocks computed at every step, outside the cached span (default 0)")
    parser.add_argument("--tail-blocks", type=int, default=0, help="last blocks computed at every step, outside the cached span (default 0)")
    parser.add_argument("--selective-blocks", type=int, default=1, help="deep blocks a selective step recomputes (default 1)")
    parser.add_argument("--selective-share", type=float, default=0.0, help="share of the budget for selective steps")
    parser.add_argument("--selective-tokens", type=float, default=0.0,
                        help="share of the tokens a selective step recomputes through the span (0: deep blocks only)")
    parser.add_argument("--forecast-order", default="auto", choices=("0", "1", "auto"),
                        help="0 reuse, 1 linear forecast, auto: the better of the two on the calibration runs")
    parser.add_argument("--target", default="span", choices=("span", "output"), help="what reused steps take from the cache")
    parser.add_argument("--refine", type=int, default=0, help="candidate schedules evaluated by real runs after the DP")
    parser.add_argument("--token-stride", type=int, default=1, help="measure every N-th token only, to save memory (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    """Run ``dit-accel calibrate``; returns the exit code."""
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
    prompts: list[str] = list(args.prompt or [])
    if args.prompts_file is not None:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        if args.model != "testbed":
            raise ValueError("give calibration prompts with --prompt or --prompts-file")
        prompts = captions_for_testbed(args.num_prompts)
    from dit_accel.loading import load_pipeline

    pipe = load_pipeline(args.model, args.device, args.dtype)
    call_kwargs: dict[str, Any] = {}
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames), ("guidance_scale", args.guidance)):
        if value is not None:
            call_kwargs[key] = value
    data = calibrate(
        pipe, prompts, num_steps=args.steps, budget=args.budget, out=args.out, model_id=args.model,
        warmup_steps=args.warmup_steps, final_steps=args.final_steps, max_consecutive_reuse=args.max_consecutive_reuse,
        head_blocks=args.head_blocks, tail_blocks=args.tail_blocks, selective_blocks=args.selective_blocks,
        selective_share=args.selective_share, selective_tokens=args.selective_tokens, forecast_order=args.forecast_order if args.forecast_order == "auto" else int(args.forecast_order), target=args.target, refine=args.refine, token_stride=args.token_stride, seed=args.seed, call_kwargs=call_kwargs,
    )
    print(f"wrote {args.out}: schedule {''.join(map(str, data['schedule']))} compute_fraction {data['compute_fraction']:.3f}")
    return 0
