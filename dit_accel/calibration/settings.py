"""What a schedule search is asked for: the step count, the budget, and the guardrails and block split the
schedule must keep (the options of ``dit-accel calibrate``)."""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.caching.fixed import FixedCacheConfig
from dit_accel.checks import check_choice, check_number


@dataclass(frozen=True)
class SearchSettings:
    """Options of one schedule search, validated on construction."""

    num_steps: int
    """Denoising steps of the calibrated runs (and of the schedule), >= 2."""
    budget: float
    """Fraction of block evaluations to spend, in (0, 1]."""
    warmup_steps: int = 2
    """First steps always computed (as :class:`~dit_accel.caching.base.CacheConfig`)."""
    final_steps: int = 1
    """Last steps always computed."""
    max_consecutive_reuse: int = 3
    """At most this many reused steps in a row."""
    head_blocks: int = 0
    """Leading blocks computed at every step."""
    tail_blocks: int = 0
    """Trailing blocks computed at every step."""
    selective_blocks: int = 1
    """Deep blocks a selective step recomputes (``procache``)."""
    selective_share: float = 0.0
    """Share of the budget spent on selective steps instead of full ones, in [0, 1) (0 for ``target="output"``)."""
    selective_tokens: float = 0.0
    """Share of the tokens a selective step recomputes through the rest of the span (``procache``'s
    ``selective_tokens``; 0 = deep blocks only), in [0, 1]."""
    forecast_order: int | str = "auto"
    """0 searches for plain reuse, 1 for a linear (Taylor order-1) forecast from the last two computed steps,
    ``"auto"`` searches both and keeps the better; ``procache`` picks the result up from the file."""
    target: str = "span"
    """``"span"`` measures the span residual, ``"output"`` the output projection's result (the quantity a
    scheduler with that ``target`` reuses); no selective steps for ``"output"``."""
    refine: int = 0
    """After the search, evaluate up to this many more candidate schedules by real cached runs and keep the one
    whose final output is closest to dense; 0 skips it."""
    token_stride: int = 1
    """Measure every ``token_stride``-th token only (memory)."""
    seed: int = 0
    """Base seed; prompt ``i`` uses ``seed + i``."""

    def __post_init__(self) -> None:
        check_number("budget", self.budget, 0, 1, lo_open=True)
        check_number("selective_share", self.selective_share, 0, 1, hi_open=True)
        check_number("selective_tokens", self.selective_tokens, 0, 1)
        check_number("num_steps", self.num_steps, 2, integer=True)
        check_choice("forecast_order", self.forecast_order, (0, 1, "auto"), spelled=True)
        check_number("refine", self.refine, 0, integer=True)
        check_number("token_stride", self.token_stride, 1, integer=True)
        if self.target == "output":
            object.__setattr__(self, "selective_share", 0.0)
        self.guard_config()  # the guardrails and the block split, checked as a cache config checks them

    def guard_config(self) -> FixedCacheConfig:
        """A cache config with these guardrails, block split and target (computing every step)."""
        return FixedCacheConfig(
            warmup_steps=self.warmup_steps, final_steps=self.final_steps, max_consecutive_reuse=self.max_consecutive_reuse,
            head_blocks=self.head_blocks, tail_blocks=self.tail_blocks, interval=1, target=self.target,
        )

    @property
    def forced(self) -> set[int]:
        """Steps the guardrails compute (warm-up and final steps)."""
        n = self.num_steps
        return set(range(min(self.warmup_steps, n))) | set(range(max(0, n - self.final_steps), n))

    @property
    def always_blocks(self) -> int:
        """Blocks that run on every step (head + tail)."""
        return self.head_blocks + self.tail_blocks

    @property
    def measured_order(self) -> int:
        """Forecast order the measurement covers (1 also measures plain reuse)."""
        return 0 if self.forecast_order == 0 else 1

    @property
    def selective(self) -> bool:
        """Whether part of the budget buys selective deep steps."""
        return self.selective_share > 0 and self.selective_blocks > 0 and self.target == "span"

    @property
    def orders(self) -> tuple[int, ...]:
        """Forecast orders searched. Selective deep steps keep a front residual beside the whole-span one; a
        forecast would be a third stream-size tensor per branch (the memory rule allows two), so with them only
        reuse is searched."""
        if self.selective:
            if self.forecast_order not in ("auto", 0):
                raise ValueError("selective deep blocks (selective_share > 0, selective_blocks > 0) need forecast_order 0 or 'auto'")
            return (0,)
        return (0, 1) if self.forecast_order == "auto" else (int(self.forecast_order),)
