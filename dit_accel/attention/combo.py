"""``combo``: the three ideas together. Permuted token order (3D tiles, or k-means clusters of keys)
+ draft selection in that order + temporal skipping between refreshes.

On a refresh call the token order is recomputed (k-means warm-started from the previous refresh)
and the draft plan is made in it; between refreshes the order is frozen, so the skip list built
from the kernel's tile statistics keeps its meaning (a tile is the same pair of token sets).
See :mod:`dit_accel.attention.permuted`, :mod:`dit_accel.attention.draft` and
:mod:`dit_accel.attention.temporal_skip` for each stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.attention.base import PlannedMethod, PlanStages
from dit_accel.attention.draft import DraftSelection
from dit_accel.attention.permuted import PermutedConfig, permuted_order
from dit_accel.attention.temporal_skip import TemporalSkip, TemporalSkipConfig


@dataclass(frozen=True)
class ComboConfig(PermutedConfig, TemporalSkipConfig):
    """Options of ``combo``: the union of ``permuted``'s and ``temporal_skip``'s options."""


class ComboMethod(PlannedMethod):
    """Permuted order + draft selection + temporal skip reuse (see the module docstring)."""

    name = "combo"
    config_class = ComboConfig

    def build_stages(self) -> PlanStages:
        """``permuted``'s order and the draft selection, both run on refresh calls of the temporal skip."""
        order, select = permuted_order(self.cfg), DraftSelection(self.cfg)
        return PlanStages(order=order, select=select, reuse=TemporalSkip(self.cfg, order, select))
