"""``taylor``: a fixed schedule whose reused steps add a Taylor forecast of the span residual (TaylorSeer at the
granularity of the block span)."""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.caching.fixed import FixedCacheConfig, FixedScheduler
from dit_accel.checks import check_choice


@dataclass(kw_only=True)
class TaylorCacheConfig(FixedCacheConfig):
    """Fixed schedule whose reused steps forecast the span residual with a Taylor expansion.

    The derivatives are divided differences of the residuals of the last computed steps, in units of
    step index (Newton form, exact for polynomial residuals): order 1 keeps the residual and one
    difference (two stream-size tensors per branch), order 2 a second difference too (three: the one
    documented exception to the two-tensor memory rule).
    """

    scheduler = "taylor"

    order: int | None = 1
    """Taylor order of the forecast: 1 (linear) or 2 (quadratic)."""

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2), spelled=True)
        super().__post_init__()


class TaylorScheduler(FixedScheduler):
    """Fixed schedule whose reused steps add a Taylor forecast of the residual (order 1 or 2; see
    :meth:`~dit_accel.caching.base.CacheScheduler.store`)."""

    name = "taylor"
    config_class = TaylorCacheConfig
