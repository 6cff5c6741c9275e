"""``combo``: the three ideas together. Permuted token order (3D tiles, or k-means clusters of keys)
+ draft selection in that order + temporal skipping between refreshes.

On a refresh call the token order is recomputed (k-means warm-started from the previous refresh)
and the draft plan is made in it; between refreshes the order is frozen, so the skip list built
from the kernel's tile statistics keeps its meaning (a tile is the same pair of token sets).
See :mod:`dit_accel.attention.permuted`, :mod:`dit_accel.attention.draft` and
:mod:`dit_accel.attention.temporal_skip` for each part.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.attention.draft import PlannedMethod
from dit_accel.attention.methods import register_method
from dit_accel.attention.permuted import PermutedConfig, PermutedMixin
from dit_accel.attention.temporal_skip import TemporalSkipConfig, TemporalSkipMixin


@dataclass(frozen=True)
class ComboConfig(PermutedConfig, TemporalSkipConfig):
    """Options of ``combo``: the union of ``permuted``'s and ``temporal_skip``'s options."""


@register_method
class ComboMethod(TemporalSkipMixin, PermutedMixin, PlannedMethod):
    """Permuted order + draft selection + temporal skip reuse (see the module docstring)."""

    name = "combo"
    config_class = ComboConfig
