"""Step 4 of the schedule search: the schedule file (``dit_accel.caching.schedule_file``) that ``fixed`` and
``procache`` load, with the measured costs behind the choice."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

from dit_accel.caching.schedule_file import SCHEDULE_FORMAT, SCHEDULE_VERSION
from dit_accel.calibration.measure import Prompt, ReuseCosts
from dit_accel.calibration.search import SearchResult, with_selective
from dit_accel.calibration.settings import SearchSettings


def schedule_data(settings: SearchSettings, result: SearchResult, costs: ReuseCosts, schedule01: list[int],
                  order: int, *, num_blocks: int, model_id: str, prompts: Sequence[Prompt],
                  measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The schedule file's content for the chosen ``schedule01`` and forecast ``order`` (the search's selective
    steps marked 2)."""
    s, m = settings, result.num_selective
    err = costs.err
    schedule, reuse_cost = with_selective(schedule01, costs.cost_fn(order), m)
    evals = sum(num_blocks if v == 1 else s.always_blocks + (result.per_selective if v == 2 else 0) for v in schedule)
    return {
        "format": SCHEDULE_FORMAT,
        "version": SCHEDULE_VERSION,
        "model": model_id,
        "num_steps": s.num_steps,
        "budget": s.budget,
        "num_blocks": num_blocks,
        "schedule": schedule,
        "forecast_order": order,
        "target": s.target,
        "selective_blocks": s.selective_blocks if m else 0,
        "selective_tokens": s.selective_tokens if m else 0.0,
        "compute_fraction": evals / (s.num_steps * num_blocks),
        "guardrails": {
            "warmup_steps": s.warmup_steps, "final_steps": s.final_steps,
            "max_consecutive_reuse": s.max_consecutive_reuse, "head_blocks": s.head_blocks, "tail_blocks": s.tail_blocks,
        },
        "errors": {
            "expected_cost": result.best[1],
            "expected_cost_by_order": {str(o): c for o, c in result.expected_by_order.items()},
            "reuse_cost": [reuse_cost.get(t, 0.0) for t in range(s.num_steps)],
            "step_change": [err.get((t - 1, t)) if t > 0 else None for t in range(s.num_steps)],
            "residual_scale": costs.scale,
            "reuse_cost_pairs": {f"{key[0]}->{key[1]}": v for key, v in err.items() if len(key) == 2},
            "metric": "dt_t * mean|R_t - forecast| / mean_t mean|R_t| (cached quantity; forecast = R_s (order 0) "
                      "or the linear extrapolation from the last two computed steps (order 1); averaged over "
                      "prompts, branches and transformers)",
            "measured": measured,
            "measured_metric": "mean over calibration prompts of |out - dense|^2 / |dense|^2 (final latents)",
        },
        "prompts": [p if isinstance(p, str) else "<kwargs>" for p in prompts],
        "seed": s.seed,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
