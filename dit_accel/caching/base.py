"""What every cache scheduler shares: the guardrail config, the per-branch state, the decision type and the
scheduler base class that stores and forecasts span residuals.

A scheduler is configuration plus decision rules; the tensors live in one state per (transformer, guidance
branch) (:attr:`CacheScheduler.state_class`, a :class:`CacheState`), owned by the controller
(:mod:`dit_accel.caching.controller`). Per transformer call the controller asks the scheduler once, on the
host, before any block runs:

* :meth:`CacheScheduler.decide` returns ``COMPUTE`` (all blocks), ``REUSE`` (skip the span and add
  the cached residual), ``SELECTIVE`` (skip the span up to the deep blocks, recompute those) or
  ``PROBE`` (run the probe blocks first, then :meth:`CacheScheduler.decide_after_probe`);
* the guardrails (warm-up, final steps, cap on consecutive reuse, no residual yet) are applied by
  :meth:`CacheScheduler.guardrail` before that and force ``COMPUTE``.

Blocks are numbered ``0..N-1`` in model order over all block lists of the transformer (e.g. FLUX's
``transformer_blocks`` then ``single_transformer_blocks``). The ``head_blocks`` first and ``tail_blocks`` last
blocks always run; the blocks between them form the *span*. Blocks ``[span_start, end)`` are skipped on a
reused step, where ``end`` is one of :attr:`CacheScheduler.slot_ends`; a residual (block ``end-1`` output minus
block ``span_start`` input) is cached per slot end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch

from dit_accel.caching.schedule_file import resample_schedule
from dit_accel.checks import check_choice, check_number
from dit_accel.context import State

OUTPUT_SLOT = -1
"""Slot key of the cached output-projection result (``target="output"``); block slots are ends >= 1."""

Streams = tuple[torch.Tensor, "torch.Tensor | None"]
"""A residual (or activation) of the hidden stream and, for joint-attention blocks, the text stream."""


@dataclass(kw_only=True)
class CacheConfig:
    """Options shared by all schedulers: guardrails and which blocks are always computed.

    Guardrails force a full computation: the first ``warmup_steps`` steps, the last ``final_steps`` steps, and
    any step after ``max_consecutive_reuse`` reused steps in a row.
    """

    scheduler: ClassVar[str] = ""
    """Registry name of the scheduler this config builds."""

    warmup_steps: int = 2
    """The first ``warmup_steps`` denoising steps are always computed in full."""
    final_steps: int = 1
    """The last ``final_steps`` denoising steps are always computed in full (needs the step count,
    known when the pipeline sets ``_num_timesteps`` or from ``num_inference_steps``)."""
    max_consecutive_reuse: int = 3
    """At most this many reused steps in a row per branch; the next step is computed in full."""
    head_blocks: int = 0
    """Leading blocks computed at every step (cache-dit's Fn); they are not part of the cached span."""
    tail_blocks: int = 0
    """Trailing blocks computed at every step (cache-dit's Bn); they are not part of the cached span."""
    num_inference_steps: int | None = None
    """Step count to assume when the pipeline does not announce it (bare transformers); ``None``: take
    the pipeline's count, and skip the ``final_steps`` guardrail when unknown."""
    order: int | None = 0
    """How a reused step fills the span: 0 adds the cached residual as is; 1 or 2 adds a Taylor forecast
    from divided differences of the residuals of the last computed steps (each order keeps one more
    stream-size tensor per branch)."""
    target: str = "span"
    """What a reused step takes from the cache. ``"span"``: the span residual, added to the fresh span
    input (the head, tail, final norm and output projection run). ``"output"``: every block after the
    head is skipped and the output projection's result (``proj_out``) is reused or forecast, as in
    diffusers' TaylorSeer lite mode; needs ``tail_blocks = 0``; its cache has the model output's size
    (latent channels), far smaller than the stream."""

    def __post_init__(self) -> None:
        check_choice("target", self.target, ("span", "output"), spelled=True)
        if self.target == "output" and self.tail_blocks:
            raise ValueError(f"target='output' skips every block after the head; tail_blocks must be 0, got {self.tail_blocks}")
        if self.order is not None:
            check_choice("order", self.order, (0, 1, 2), spelled=True)
        check_number("warmup_steps", self.warmup_steps, 0, integer=True)
        check_number("final_steps", self.final_steps, 0, integer=True)
        check_number("max_consecutive_reuse", self.max_consecutive_reuse, 0, integer=True)
        check_number("head_blocks", self.head_blocks, 0, integer=True)
        check_number("tail_blocks", self.tail_blocks, 0, integer=True)
        check_number("num_inference_steps", self.num_inference_steps, 1, integer=True, allow_none=True)

    def to_dict(self) -> dict[str, Any]:
        """The options as plain data (run logs, schedule files)."""
        out: dict[str, Any] = {"scheduler": self.scheduler}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def check_schedule(name: str, schedule: Any, allowed: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``schedule`` is a non-empty list of values in ``allowed``."""
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError(f"{name} must be a non-empty list of ints in {list(allowed)}, got {schedule!r}")
    bad = [v for v in schedule if isinstance(v, bool) or v not in allowed]
    if bad:
        raise ValueError(f"{name} values must be in {list(allowed)} (1 = compute, 0 = reuse), got {bad[:5]}")


def schedule_value(schedule: list[int] | None, step: int, num_steps: int | None) -> int | None:
    """The schedule's value at ``step`` after resampling to ``num_steps``; ``None`` past its end."""
    if schedule is None:
        return None
    if num_steps is not None and num_steps != len(schedule):
        schedule = resample_schedule(schedule, num_steps)
    return schedule[step] if step < len(schedule) else None


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
class CacheState(State):
    """Cached residuals and counters of one (transformer, guidance branch), reset per pipeline call."""

    slots: dict[int, Streams] = field(default_factory=dict)
    """Cached span residual per slot end (block index, exclusive), or the output (``OUTPUT_SLOT``)."""
    derivatives: dict[int, list[Streams]] = field(default_factory=dict)
    """Taylor finite differences per slot end: ``[d1]`` or ``[d1, d2]`` (step-index units)."""
    slot_steps: dict[int, int] = field(default_factory=dict)
    """Step at which each slot was last refreshed."""
    diff_steps: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Steps of the residuals behind the Taylor differences per slot, latest first."""
    reused_in_row: int = 0
    """Reused (or selective) steps since the last fully computed one."""
    last_computed_step: int | None = None
    """Step index of the last full computation."""

    def tensors(self) -> list[torch.Tensor | None]:
        """The tensors held across steps."""
        out: list[torch.Tensor | None] = []
        for streams in self.slots.values():
            out.extend(streams)
        for derivs in self.derivatives.values():
            for streams in derivs:
                out.extend(streams)
        return out

    def nbytes(self) -> int:
        """Bytes of the tensors held across steps."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


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
    """Base class: guardrails, the block split and the store/forecast of the span residuals."""

    name: ClassVar[str] = ""
    """Registry name."""
    config_class: ClassVar[type[CacheConfig]] = CacheConfig
    """Config dataclass this scheduler is built from."""
    state_class: ClassVar[type[CacheState]] = CacheState
    """State dataclass of one (transformer, guidance branch)."""

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

    def guardrail(self, info: StepInfo, state: CacheState) -> str | None:
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

    def decide(self, info: StepInfo, state: CacheState) -> Decision:
        """Decision for a step the guardrails leave free."""
        raise NotImplementedError

    def decide_after_probe(self, state: CacheState, change: float) -> Decision:
        """Decision once the probe's relative change is known (probe schedulers only)."""
        raise NotImplementedError(f"{self.name} has no probe")

    def observe_probe(self, state: CacheState, probe: torch.Tensor) -> torch.Tensor | None:
        """Record this step's probe; return ``[mean|p - p_prev|, mean|p_prev|]`` (the relative L1 change
        is their ratio; kept apart so that ranks of a context-parallel run can sum them first)."""
        return None

    def end_call(self, state: CacheState, step: int, computed: bool) -> None:
        """Update the counters once a call ran: ``computed`` (every block ran) or reused."""
        if computed:
            state.reused_in_row = 0
            state.last_computed_step = step
        else:
            state.reused_in_row += 1

    def record(self, state: CacheState) -> dict[str, Any]:
        """Scheduler values added to each statistics record (the probe's accumulated change)."""
        return {"accumulated": None}

    # --- residuals -----------------------------------------------------------------------------
    @property
    def order(self) -> int:
        """Forecast order (0: plain reuse)."""
        return self.config.order or 0

    def store(self, state: CacheState, end: int, residual: Streams, step: int) -> None:
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

    def forecast(self, state: CacheState, end: int, step: int) -> Streams:
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
