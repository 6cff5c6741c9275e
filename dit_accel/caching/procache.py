"""``procache``: an offline-searched non-uniform schedule with selective recomputation of the deep blocks and
of the tokens that changed most (ProCache)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dit_accel.caching.base import (
    OUTPUT_SLOT,
    CacheConfig,
    CacheScheduler,
    CacheState,
    Decision,
    StepInfo,
    check_schedule,
    schedule_value,
)
from dit_accel.caching.schedule_file import load_schedule
from dit_accel.checks import check_number

logger = logging.getLogger("dit_accel")


@dataclass(kw_only=True)
class ProCacheConfig(CacheConfig):
    """ProCache-style: an offline-searched non-uniform schedule plus selective recomputation.

    Schedule values per step: 1 = compute all blocks, 0 = reuse the whole span, 2 = *selective*:
    reuse the span up to the last ``selective_blocks`` blocks and recompute those deep blocks, which
    also refreshes the cached whole-span residual; with ``selective_tokens`` > 0 the tokens whose
    features changed most are recomputed through the reused part too. The schedule comes from ``schedule_file``
    (written by ``dit-accel calibrate``), else from ``schedule``, else a built-in non-uniform pattern with
    compute fraction ``budget`` (dense early and late, sparse in the middle).
    """

    scheduler = "procache"

    schedule: list[int] | None = None
    """Per-step list of 0/1/2 (see class doc); resampled to the run's step count when lengths differ."""
    schedule_file: str | Path | None = None
    """A schedule JSON written by ``dit-accel calibrate``."""
    budget: float = 0.5
    """Compute fraction of the built-in pattern (used only without ``schedule`` or ``schedule_file``)."""
    selective_blocks: int = 1
    """Deep blocks recomputed on selective (value 2) steps; 0 (with ``selective_tokens`` 0) turns
    selective steps into plain reuse. Selective deep steps keep a second (front-span) residual, so they
    take no forecast (``order`` must be 0). On the 6-block testbed they did not pay (28.8 dB vs 35.5 dB
    for the same budget spent on full steps)."""
    selective_tokens: float | None = None
    """Share of the tokens (in [0, 1]) that selective (value 2) steps recompute through the reused front
    span (the span minus its deep blocks): per batch row, the tokens whose span input changed most since
    their cached residual was computed (change measured on a 32-dimensional random sketch of each token).
    Their fresh outputs replace the reused ones and refresh their rows of the cached residual; the other
    tokens reuse it. Self-attention of the recomputed tokens sees only the recomputed tokens (cost:
    share x the linear layers, share^2 x the attention). 0: off (selective steps recompute the deep blocks
    only); 1: the front span is computed in full. ``None``: the schedule file's ``selective_tokens``, 0
    without a file. Needs blocks whose text stream is separate (cross-attention families: Wan, LTX,
    PixArt); joint-attention blocks raise. On the trained testbed 25 % of the tokens on a quarter of the
    budget *lowered* PSNR vs spending it on full steps (26.6 vs 35.5 dB at 50 % compute, 27.5 vs 28.9 at
    35 %): the recomputed tokens lose the attention context of the others. Off by default and in every
    preset."""
    order: int | None = None
    """Forecast order (see :class:`CacheConfig`); ``None``: the schedule file's ``forecast_order`` (the
    order its search assumed), 0 without a file."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("budget", self.budget, 0.0, 1.0, lo_open=True)
        check_number("selective_blocks", self.selective_blocks, 0, integer=True)
        check_number("selective_tokens", self.selective_tokens, 0.0, 1.0, allow_none=True)
        if self.target == "output" and (self.selective_blocks or self.selective_tokens):
            raise ValueError("target='output' has no selective steps; set selective_blocks=0 and selective_tokens=0")
        if self.schedule is not None:
            check_schedule("schedule", self.schedule, (0, 1, 2))
            self.schedule = list(self.schedule)


@dataclass
class ProCacheState(CacheState):
    """:class:`CacheState` plus the token sketch of the selective-token steps."""

    token_sketch: torch.Tensor | None = None
    """Per-token random sketch ``(rows, tokens, 32)`` of the span input at the step each token's cached
    front residual comes from (ProCache token selection); tiny next to the stream."""

    def tensors(self) -> list[torch.Tensor | None]:
        """The cached residuals and the token sketch."""
        return [self.token_sketch, *super().tensors()]


def default_procache_pattern(num_steps: int, budget: float, config: CacheConfig) -> list[int]:
    """A non-uniform 0/1 pattern with about ``budget * num_steps`` computed steps.

    Guardrail steps (warm-up, final) are computed; the remaining computed steps are spread with a
    cosine warp, denser near both ends where the features change fastest in flow-matching samplers.
    Gaps longer than ``max_consecutive_reuse`` get extra computed steps (so the fraction may exceed
    the budget for tiny budgets).
    """
    total = max(1, round(budget * num_steps))
    pattern = [0] * num_steps
    for i in range(min(config.warmup_steps, num_steps)):
        pattern[i] = 1
    for i in range(max(0, num_steps - config.final_steps), num_steps):
        pattern[i] = 1
    free = [i for i in range(num_steps) if not pattern[i]]
    extra = max(0, total - sum(pattern))
    if free and extra:
        n = min(extra, len(free))
        for j in range(n):
            u = (j + 0.5) / n
            pos = (1.0 - math.cos(math.pi * u)) / 2.0
            pattern[free[min(len(free) - 1, int(pos * len(free)))]] = 1
    run = 0
    for i in range(num_steps):
        run = 0 if pattern[i] else run + 1
        if run > config.max_consecutive_reuse:
            pattern[i] = 1
            run = 0
    return pattern


class ProCacheScheduler(CacheScheduler):
    """Offline-searched non-uniform schedule with selective recomputation of deep blocks and tokens.

    Two residuals per branch: the whole span ``[head, N - tail)`` (reused on value-0 steps) and the
    front part ``[head, N - tail - selective_blocks)`` (reused on value-2 steps, where the deep blocks
    run and refresh the whole-span residual). With ``selective_tokens`` the value-2 steps also run the
    front part on the tokens that changed most (see :class:`ProCacheConfig`); the token selection keeps
    one small per-token sketch per branch (:class:`ProCacheState`).
    """

    name = "procache"
    config_class = ProCacheConfig
    state_class = ProCacheState

    def __init__(self, config: ProCacheConfig, num_blocks: int) -> None:
        super().__init__(config, num_blocks)
        self.schedule: list[int] | None = None
        self._order = config.order or 0
        self._token_share = config.selective_tokens or 0.0
        if config.schedule_file is not None:
            data = load_schedule(config.schedule_file)
            self.schedule = list(data["schedule"])
            if config.order is None:
                self._order = int(data.get("forecast_order", 0))
            if config.selective_tokens is None:
                self._token_share = float(data.get("selective_tokens", 0.0))
            if data.get("target", "span") != config.target:
                logger.warning("schedule file %s was searched for target=%r, used with target=%r",
                               config.schedule_file, data.get("target", "span"), config.target)
        elif config.schedule is not None:
            self.schedule = list(config.schedule)
        self._patterns: dict[int, list[int]] = {}
        # The front residual is kept only when some step recomputes the deep blocks (the built-in
        # pattern has none), so a plain schedule holds one residual per branch (plus the forecast's).
        self._deep = config.selective_blocks if self.schedule is not None and 2 in self.schedule else 0
        if self._deep and self._order:
            raise ValueError(
                f"procache with selective deep blocks (schedule value 2, selective_blocks={config.selective_blocks}) "
                f"keeps a front and a whole-span residual; a forecast of order {self._order} would add a third "
                "stream-size tensor per branch: use order=0 or selective_blocks=0"
            )

    @property
    def order(self) -> int:
        """The config's order, else the schedule file's ``forecast_order``."""
        return self._order

    @property
    def token_share(self) -> float:
        """The config's ``selective_tokens``, else the schedule file's."""
        return self._token_share

    @staticmethod
    def extra_deep_blocks(config: CacheConfig) -> int:
        """The selective (deep) blocks sit just before the tail."""
        return getattr(config, "selective_blocks", 0)

    @property
    def slot_ends(self) -> tuple[int, ...]:
        """Front span (if selective blocks) and whole span."""
        if self.output_target:
            return (OUTPUT_SLOT,)
        whole = self.num_blocks - self.config.tail_blocks
        return (whole - self._deep, whole) if self._deep else (whole,)

    def reuse_end(self, decision: Decision) -> int:
        """Selective steps skip only the front span."""
        if self.output_target:
            return self.num_blocks
        return self.slot_ends[0] if decision is Decision.SELECTIVE else self.slot_ends[-1]

    def pattern(self, num_steps: int | None) -> list[int] | None:
        """The schedule for a run of ``num_steps`` steps (built-in pattern when none was given)."""
        if self.schedule is not None:
            return self.schedule
        if num_steps is None:
            return None
        if num_steps not in self._patterns:
            self._patterns[num_steps] = default_procache_pattern(num_steps, self.config.budget, self.config)  # type: ignore[attr-defined]
        return self._patterns[num_steps]

    def decide(self, info: StepInfo, state: CacheState) -> Decision:
        """Schedule value 1 computes, 0 reuses, 2 is selective (plain reuse without selective blocks)."""
        total = self.num_steps(info)
        value = schedule_value(self.pattern(total), info.step, total)
        if value == 0:
            return Decision.REUSE
        if value == 2:
            return Decision.SELECTIVE if (self._deep or self.token_share > 0) else Decision.REUSE
        return Decision.COMPUTE
