"""``fixed``: reuse the span residual on the steps a fixed schedule marks 0 (a uniform interval, a per-step
list, or a schedule file written by ``dit-accel calibrate``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dit_accel.caching.base import CacheConfig, CacheScheduler, CacheState, Decision, StepInfo, check_schedule, schedule_value
from dit_accel.caching.schedule_file import load_schedule
from dit_accel.checks import check_number


@dataclass(kw_only=True)
class FixedCacheConfig(CacheConfig):
    """Residual reuse on a fixed schedule: uniform (``interval``) or an explicit per-step list or file.

    Exactly one source of the schedule is used: ``schedule_file`` if given, else ``schedule``, else
    ``interval``.
    """

    scheduler = "fixed"

    interval: int = 2
    """Compute every ``interval``-th step after the warm-up (1 computes every step)."""
    schedule: list[int] | None = None
    """Per-step list, 1 = compute, 0 = reuse; resampled to the run's step count when lengths differ."""
    schedule_file: str | Path | None = None
    """A schedule JSON written by ``dit-accel calibrate`` (its ``schedule``; values 2 count as 1 here)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("interval", self.interval, 1, integer=True)
        if self.schedule is not None:
            check_schedule("schedule", self.schedule, (0, 1))
            self.schedule = list(self.schedule)


class FixedScheduler(CacheScheduler):
    """Reuse the span residual on the steps a fixed schedule marks 0 (uniform interval or a list)."""

    name = "fixed"
    config_class = FixedCacheConfig

    def __init__(self, config: FixedCacheConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        self.schedule: list[int] | None = None
        if config.schedule_file is not None:
            self.schedule = [1 if v else 0 for v in load_schedule(config.schedule_file)["schedule"]]
        elif config.schedule is not None:
            self.schedule = list(config.schedule)

    def decide(self, info: StepInfo, state: CacheState) -> Decision:
        """1 in the schedule (or an interval hit) computes; 0 reuses; past the list's end computes."""
        cfg: FixedCacheConfig = self.config  # type: ignore[assignment]
        if self.schedule is None:
            k = info.step - cfg.warmup_steps
            return Decision.COMPUTE if k % cfg.interval == 0 else Decision.REUSE
        value = schedule_value(self.schedule, info.step, self.num_steps(info))
        return Decision.REUSE if value == 0 else Decision.COMPUTE
