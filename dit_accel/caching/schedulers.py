"""Cache schedulers: per step and guidance branch, compute the block span or reuse its residual.

A scheduler is configuration plus decision rules; the tensors live in one :class:`BranchState` per
(transformer, guidance branch), owned by the hook controller (``dit_accel.caching.hooks``). Per
transformer call the controller asks the scheduler once, on the host, before any block runs:

* :meth:`CacheScheduler.decide` returns ``COMPUTE`` (all blocks), ``REUSE`` (skip the span and add
  the cached residual), ``SELECTIVE`` (skip the span up to the deep blocks, recompute those) or
  ``PROBE`` (run the probe blocks first, then :meth:`CacheScheduler.decide_after_probe`);
* the guardrails (warm-up, final steps, cap on consecutive reuse, no residual yet) are applied by
  :meth:`CacheScheduler.guardrail` before that and force ``COMPUTE``.

Blocks ``[span_start, end)`` are skipped on a reused step, where ``end`` is one of
:attr:`CacheScheduler.slot_ends`; a residual (block ``end-1`` output minus block ``span_start``
input) is cached per slot end. Schedulers are registered by name with :func:`register_scheduler`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import torch

from dit_accel.caching.config import (
    CacheConfig,
    FixedCacheConfig,
    ProbeCacheConfig,
    ProCacheConfig,
    TaylorCacheConfig,
)
from dit_accel.caching.schedule_file import load_schedule, resample_schedule

OUTPUT_SLOT = -1
"""Slot key of the cached output-projection result (``target="output"``); block slots are ends >= 1."""

logger = logging.getLogger("dit_accel")

Streams = tuple[torch.Tensor, "torch.Tensor | None"]
"""A residual (or activation) of the hidden stream and, for joint-attention blocks, the text stream."""


class Decision(str, Enum):
    """What one transformer call does with the cached span."""

    COMPUTE = "compute"
    """Run every block; refresh the cached residuals."""
    REUSE = "reuse"
    """Skip the span; add the cached (or forecast) residual."""
    SELECTIVE = "selective"
    """Skip the span up to the deep blocks and recompute those (ProCache)."""
    PROBE = "probe"
    """Run the probe blocks, then decide between COMPUTE and REUSE."""


@dataclass(frozen=True)
class StepInfo:
    """Where the denoising loop is, as seen by one transformer call."""

    step: int
    """Denoising step index (0-based) within the pipeline call."""
    num_steps: int | None
    """Total steps of the call; ``None`` when unknown."""


@dataclass
class BranchState:
    """Cached tensors and counters of one (transformer, guidance branch), reset per pipeline call."""

    slots: dict[int, Streams] = field(default_factory=dict)
    """Cached span residual per slot end (block index, exclusive), or the output (``OUTPUT_SLOT``)."""
    derivatives: dict[int, list[Streams]] = field(default_factory=dict)
    """Taylor finite differences per slot end: ``[d1]`` or ``[d1, d2]`` (step-index units)."""
    slot_steps: dict[int, int] = field(default_factory=dict)
    """Step at which each slot was last refreshed."""
    diff_steps: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Steps of the residuals behind the Taylor differences per slot, latest first."""
    probe: torch.Tensor | None = None
    """Previous step's probe residual (hidden stream, strided tokens)."""
    token_sketch: torch.Tensor | None = None
    """Per-token random sketch ``(rows, tokens, 32)`` of the span input at the step each token's cached
    front residual comes from (ProCache token selection); tiny next to the stream."""
    accumulated: float = 0.0
    """Accumulated relative L1 change of the probe since the last computed step."""
    reused_in_row: int = 0
    """Reused (or selective) steps since the last fully computed one."""
    last_computed_step: int | None = None
    """Step index of the last full computation."""

    def nbytes(self) -> int:
        """Bytes of the tensors held across steps."""
        total = 0
        tensors: list[torch.Tensor | None] = [self.probe, self.token_sketch]
        for streams in self.slots.values():
            tensors.extend(streams)
        for derivs in self.derivatives.values():
            for streams in derivs:
                tensors.extend(streams)
        for t in tensors:
            if t is not None:
                total += t.numel() * t.element_size()
        return total


def _add(a: Streams, b: Streams, scale: float = 1.0) -> Streams:
    out = []
    for x, y in zip(a, b):
        out.append(None if x is None or y is None else (x + y * scale if scale != 1.0 else x + y))
    return (out[0], out[1])


def _sub_div(a: Streams, b: Streams, d: float) -> Streams:
    out = []
    for x, y in zip(a, b):
        out.append(None if x is None or y is None else (x - y) / d)
    return (out[0], out[1])


class CacheScheduler:
    """Base class: guardrails, the block split and the store/forecast of a zero-order residual."""

    name: ClassVar[str] = ""
    """Registry name."""
    config_class: ClassVar[type[CacheConfig]] = CacheConfig
    """Config dataclass this scheduler is built from."""

    def __init__(self, config: CacheConfig, num_blocks: int) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        _check_split(config, num_blocks, self.extra_deep_blocks(config))
        self.config = config
        self.num_blocks = num_blocks

    # --- block split ---------------------------------------------------------------------------
    @staticmethod
    def extra_deep_blocks(config: CacheConfig) -> int:
        """Blocks before the tail that are recomputed on selective steps (0 except ProCache)."""
        return 0

    @property
    def span_start(self) -> int:
        """First block of the cached span (blocks before it always run)."""
        return self.config.head_blocks

    @property
    def probe_blocks(self) -> int:
        """Blocks whose residual is the probe (0: no probe)."""
        return 0

    @property
    def token_share(self) -> float:
        """Share of the tokens recomputed through the front span on selective steps (0: none)."""
        return 0.0

    @property
    def output_target(self) -> bool:
        """True when reused steps forecast the output projection instead of a span residual."""
        return self.config.target == "output"

    @property
    def slot_ends(self) -> tuple[int, ...]:
        """Ends (exclusive) of the spans whose residuals are cached, ascending (``(OUTPUT_SLOT,)`` for
        ``target="output"``)."""
        if self.output_target:
            return (OUTPUT_SLOT,)
        return (self.num_blocks - self.config.tail_blocks,)

    def reuse_end(self, decision: Decision) -> int:
        """End (exclusive) of the skipped blocks for a REUSE or SELECTIVE decision."""
        return self.num_blocks if self.output_target else self.slot_ends[-1]

    # --- decisions -------------------------------------------------------------------------------
    def num_steps(self, info: StepInfo) -> int | None:
        """The step count to use: the pipeline's, else the config's."""
        return info.num_steps if info.num_steps is not None else self.config.num_inference_steps

    def guardrail(self, info: StepInfo, state: BranchState) -> str | None:
        """Why this step must be computed in full, or ``None``."""
        cfg = self.config
        if not state.slots:
            return "no_cache"
        if info.step < cfg.warmup_steps:
            return "warmup"
        total = self.num_steps(info)
        if total is not None and info.step >= total - cfg.final_steps:
            return "final"
        if state.reused_in_row >= cfg.max_consecutive_reuse:
            return "max_consecutive"
        return None

    def decide(self, info: StepInfo, state: BranchState) -> Decision:
        """Decision for a step the guardrails leave free."""
        raise NotImplementedError

    def decide_after_probe(self, state: BranchState, change: float) -> Decision:
        """Decision once the probe's relative change is known (probe schedulers only)."""
        raise NotImplementedError(f"{self.name} has no probe")

    def observe_probe(self, state: BranchState, probe: torch.Tensor) -> torch.Tensor | None:
        """Record this step's probe; return ``[mean|p - p_prev|, mean|p_prev|]`` (the relative L1 change
        is their ratio; kept apart so that ranks of a context-parallel run can sum them first)."""
        return None

    # --- residuals -----------------------------------------------------------------------------
    @property
    def order(self) -> int:
        """Forecast order (0: plain reuse)."""
        return self.config.order or 0

    def store(self, state: BranchState, end: int, residual: Streams, step: int) -> None:
        """Keep ``residual`` as slot ``end`` at ``step``, with its divided differences when ``order > 0``.

        Newton form: with residuals at computed steps ``s2 < s1 < s0`` (``s0`` latest),
        ``d1 = (R(s0) - R(s1)) / (s0 - s1)`` and ``d2 = (d1(s0) - d1(s1)) / (s0 - s2)`` in step-index
        units; the differences restart when the shape changes.
        """
        # Only the whole span is forecast: ProCache's front slot (selective steps) stays zero order,
        # so memory stays at one tensor per slot plus one per order.
        order = self.order if end == self.slot_ends[-1] else 0
        if order:
            old = state.slots.get(end)
            steps = state.diff_steps.get(end, ())
            derivs: list[Streams] = []
            if old is not None and steps and step > steps[0] and old[0].shape == residual[0].shape:
                derivs.append(_sub_div(residual, old, float(step - steps[0])))
                old_derivs = state.derivatives.get(end, [])
                if order >= 2 and old_derivs and len(steps) >= 2:
                    derivs.append(_sub_div(derivs[0], old_derivs[0], float(step - steps[1])))
                steps = (step,) + steps[:1]
            else:
                steps = (step,)
            state.derivatives[end] = derivs
            state.diff_steps[end] = steps
        state.slots[end] = residual
        state.slot_steps[end] = step

    def forecast(self, state: BranchState, end: int, step: int) -> Streams:
        """Residual for slot ``end`` at ``step``: ``R(s0) + d1 (t - s0) + d2 (t - s0)(t - s1)`` with the
        available differences (the cached residual itself at order 0): exact for residuals that are
        polynomials of that order in the step index."""
        out = state.slots[end]
        derivs = state.derivatives.get(end, [])
        if not derivs:
            return out
        steps = state.diff_steps[end]
        coeff = 1.0
        for i, deriv in enumerate(derivs):
            coeff *= float(step - steps[i])
            out = _add(out, deriv, coeff)
        return out

    def describe(self) -> dict[str, Any]:
        """Options as plain data, for run logs."""
        return self.config.to_dict()


def _check_split(config: CacheConfig, num_blocks: int, deep: int) -> None:
    if num_blocks < 1:
        raise ValueError(f"the transformer has no blocks to cache (found {num_blocks})")
    span = num_blocks - config.head_blocks - config.tail_blocks - deep
    if span < 1:
        raise ValueError(
            f"head_blocks={config.head_blocks} + tail_blocks={config.tail_blocks}"
            + (f" + selective_blocks={deep}" if deep else "")
            + f" leave no block to cache in a transformer of {num_blocks} blocks"
        )


# --- registry -------------------------------------------------------------------------------------
_SCHEDULERS: dict[str, type[CacheScheduler]] = {}


def register_scheduler(cls: type[CacheScheduler]) -> type[CacheScheduler]:
    """Class decorator: register a :class:`CacheScheduler` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, CacheScheduler)) or not cls.name:
        raise TypeError(f"register_scheduler expects a named CacheScheduler subclass, got {cls!r}")
    if cls.name in _SCHEDULERS and _SCHEDULERS[cls.name] is not cls:
        raise ValueError(f"cache scheduler {cls.name!r} is already registered by {_SCHEDULERS[cls.name].__name__}")
    _SCHEDULERS[cls.name] = cls
    return cls


def available_schedulers() -> list[str]:
    """Names of the registered cache schedulers."""
    return sorted(_SCHEDULERS)


def make_cache_config(name: str | CacheConfig, **options: Any) -> CacheConfig:
    """The config for scheduler ``name`` with keyword ``options`` (a config instance is returned as is).

    Raises ``ValueError`` naming an unknown scheduler or option and the allowed ones.
    """
    if isinstance(name, CacheConfig):
        if options:
            raise ValueError(f"options {sorted(options)} given together with a config instance {name!r}")
        if name.scheduler not in _SCHEDULERS:
            raise ValueError(f"config {type(name).__name__} has no registered scheduler; available: {available_schedulers()}")
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"cache must be a scheduler name or a CacheConfig, got {type(name).__name__}: {name!r}; "
            f"available schedulers: {available_schedulers()}"
        )
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown cache scheduler {name!r}; available schedulers: {available_schedulers()}")
    config_cls = _SCHEDULERS[name].config_class
    allowed = sorted(f for f in config_cls.__dataclass_fields__ if not f.startswith("_"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for cache scheduler {name!r}; allowed options: {allowed}")
    return config_cls(**options)


def build_scheduler(config: CacheConfig, num_blocks: int) -> CacheScheduler:
    """The scheduler for ``config`` on a transformer of ``num_blocks`` blocks."""
    config = make_cache_config(config)
    return _SCHEDULERS[config.scheduler](config, num_blocks)


# --- schedulers -----------------------------------------------------------------------------------
def _schedule_value(schedule: list[int] | None, step: int, num_steps: int | None) -> int | None:
    """The schedule's value at ``step`` after resampling to ``num_steps``; ``None`` past its end."""
    if schedule is None:
        return None
    if num_steps is not None and num_steps != len(schedule):
        schedule = resample_schedule(schedule, num_steps)
    return schedule[step] if step < len(schedule) else None


@register_scheduler
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

    def decide(self, info: StepInfo, state: BranchState) -> Decision:
        """1 in the schedule (or an interval hit) computes; 0 reuses; past the list's end computes."""
        cfg: FixedCacheConfig = self.config  # type: ignore[assignment]
        if self.schedule is None:
            k = info.step - cfg.warmup_steps
            return Decision.COMPUTE if k % cfg.interval == 0 else Decision.REUSE
        value = _schedule_value(self.schedule, info.step, self.num_steps(info))
        return Decision.REUSE if value == 0 else Decision.COMPUTE


@register_scheduler
class TaylorScheduler(FixedScheduler):
    """Fixed schedule whose reused steps add a Taylor forecast of the residual (order 1 or 2; see
    :meth:`CacheScheduler.store`), the TaylorSeer idea at the granularity of the block span."""

    name = "taylor"
    config_class = TaylorCacheConfig


@register_scheduler
class ProbeScheduler(CacheScheduler):
    """First-block probe with an accumulated relative-L1 budget (see :class:`ProbeCacheConfig`)."""

    name = "probe"
    config_class = ProbeCacheConfig

    @property
    def probe_blocks(self) -> int:
        """The probe is the residual of the head blocks."""
        return self.config.head_blocks

    def decide(self, info: StepInfo, state: BranchState) -> Decision:
        """Always probe first."""
        return Decision.PROBE

    def observe_probe(self, state: BranchState, probe: torch.Tensor) -> torch.Tensor | None:
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

    def decide_after_probe(self, state: BranchState, change: float) -> Decision:
        """Reuse while the accumulated change stays under the threshold."""
        threshold: float = self.config.threshold  # type: ignore[attr-defined]
        if not math.isfinite(change):
            return Decision.COMPUTE
        if state.accumulated + change < threshold:
            state.accumulated += change
            return Decision.REUSE
        return Decision.COMPUTE


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


@register_scheduler
class ProCacheScheduler(CacheScheduler):
    """Offline-searched non-uniform schedule with selective recomputation of deep blocks and tokens.

    Two residuals per branch: the whole span ``[head, N - tail)`` (reused on value-0 steps) and the
    front part ``[head, N - tail - selective_blocks)`` (reused on value-2 steps, where the deep blocks
    run and refresh the whole-span residual). With ``selective_tokens`` the value-2 steps also run the
    front part on the tokens that changed most (see :class:`ProCacheConfig`); the token selection keeps
    one small per-token sketch per branch.
    """

    name = "procache"
    config_class = ProCacheConfig

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

    def decide(self, info: StepInfo, state: BranchState) -> Decision:
        """Schedule value 1 computes, 0 reuses, 2 is selective (plain reuse without selective blocks)."""
        total = self.num_steps(info)
        value = _schedule_value(self.pattern(total), info.step, total)
        if value == 0:
            return Decision.REUSE
        if value == 2:
            return Decision.SELECTIVE if (self._deep or self.token_share > 0) else Decision.REUSE
        return Decision.COMPUTE
