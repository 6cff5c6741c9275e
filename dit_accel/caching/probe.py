"""``probe``: a first-block probe with an accumulated relative-error budget (the FBCache/TeaCache family)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dit_accel.caching.base import CacheConfig, CacheScheduler, CacheState, Decision, StepInfo
from dit_accel.checks import check_number


@dataclass(kw_only=True)
class ProbeCacheConfig(CacheConfig):
    """First-block probe with an accumulated relative-error budget.

    The first ``head_blocks`` blocks (the probe, at least 1) run at every step. The relative L1 change
    of their residual against the previous step's, ``mean|p_t - p_{t-1}| / mean|p_{t-1}|``, is added to
    an accumulator per branch; the span is reused while the accumulator stays below ``threshold`` and
    the accumulator restarts at 0 whenever the span is computed.
    """

    scheduler = "probe"

    head_blocks: int = 1
    """Number of probe blocks (computed at every step); at least 1."""
    threshold: float = 0.1
    """Budget of accumulated relative L1 change of the probe residual before the span is recomputed."""
    probe_token_stride: int = 1
    """Compare every ``probe_token_stride``-th token only (smaller saved probe; 1 = all tokens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("head_blocks", self.head_blocks, 1, integer=True)
        check_number("threshold", self.threshold, 0.0)
        check_number("probe_token_stride", self.probe_token_stride, 1, integer=True)


@dataclass
class ProbeState(CacheState):
    """:class:`CacheState` plus the previous probe and the accumulated change."""

    probe: torch.Tensor | None = None
    """Previous step's probe residual (hidden stream, strided tokens)."""
    accumulated: float = 0.0
    """Accumulated relative L1 change of the probe since the last computed step."""

    def tensors(self) -> list[torch.Tensor | None]:
        """The cached residuals and the probe."""
        return [self.probe, *super().tensors()]


class ProbeScheduler(CacheScheduler):
    """First-block probe with an accumulated relative-L1 budget (see :class:`ProbeCacheConfig`)."""

    name = "probe"
    config_class = ProbeCacheConfig
    state_class = ProbeState

    @property
    def probe_blocks(self) -> int:
        """The probe is the residual of the head blocks."""
        return self.config.head_blocks

    def decide(self, info: StepInfo, state: CacheState) -> Decision:
        """Always probe first."""
        return Decision.PROBE

    def observe_probe(self, state: ProbeState, probe: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Relative L1 of the strided probe vs the previous step's; keep this one."""
        stride: int = self.config.probe_token_stride  # type: ignore[attr-defined]
        if stride > 1 and probe.dim() >= 2:
            probe = probe[:, ::stride]
        probe = probe.detach()
        prev = state.probe
        state.probe = probe
        if prev is None or prev.shape != probe.shape:
            return None
        num = (probe.float() - prev.float()).abs().mean()
        den = prev.float().abs().mean()
        return torch.stack([num, den])

    def decide_after_probe(self, state: ProbeState, change: float) -> Decision:  # type: ignore[override]
        """Reuse while the accumulated change stays under the threshold."""
        threshold: float = self.config.threshold  # type: ignore[attr-defined]
        if not math.isfinite(change):
            return Decision.COMPUTE
        if state.accumulated + change < threshold:
            state.accumulated += change
            return Decision.REUSE
        return Decision.COMPUTE

    def end_call(self, state: ProbeState, step: int, computed: bool) -> None:  # type: ignore[override]
        """A computed call also restarts the accumulator."""
        super().end_call(state, step, computed)
        if computed:
            state.accumulated = 0.0

    def record(self, state: ProbeState) -> dict[str, Any]:  # type: ignore[override]
        """The accumulated change after this call."""
        return {"accumulated": state.accumulated}
