"""Typed configurations of the feature-cache schedulers, validated on construction.

Every scheduler shares the guardrails and the block split of :class:`CacheConfig`:

* blocks are numbered ``0..N-1`` in model order over all block lists of the transformer
  (e.g. FLUX's ``transformer_blocks`` then ``single_transformer_blocks``);
* ``head_blocks`` first blocks and ``tail_blocks`` last blocks always run; the blocks between them
  form the *span* whose residual (span output minus span input) is cached and reused;
* guardrails force a full computation: the first ``warmup_steps`` steps, the last ``final_steps``
  steps, and any step after ``max_consecutive_reuse`` reused steps in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any, low: float, high: float | None = None, *, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high):
        bound = f"in ({low}, {high}]" if low_open else f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


@dataclass(kw_only=True)
class CacheConfig:
    """Options shared by all schedulers: guardrails and which blocks are always computed."""

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
        if self.target not in ("span", "output"):
            raise ValueError(f"target must be 'span' or 'output', got {self.target!r}")
        if self.target == "output" and self.tail_blocks:
            raise ValueError(f"target='output' skips every block after the head; tail_blocks must be 0, got {self.tail_blocks}")
        if self.order is not None and (isinstance(self.order, bool) or self.order not in (0, 1, 2)):
            raise ValueError(f"order must be 0, 1 or 2, got {self.order!r}")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("final_steps", self.final_steps, 0)
        _check_int("max_consecutive_reuse", self.max_consecutive_reuse, 0)
        _check_int("head_blocks", self.head_blocks, 0)
        _check_int("tail_blocks", self.tail_blocks, 0)
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1)

    def to_dict(self) -> dict[str, Any]:
        """The options as plain data (run logs, schedule files)."""
        out: dict[str, Any] = {"scheduler": self.scheduler}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def _check_schedule(name: str, schedule: Any, allowed: tuple[int, ...]) -> None:
    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise ValueError(f"{name} must be a non-empty list of ints in {list(allowed)}, got {schedule!r}")
    bad = [v for v in schedule if isinstance(v, bool) or v not in allowed]
    if bad:
        raise ValueError(f"{name} values must be in {list(allowed)} (1 = compute, 0 = reuse), got {bad[:5]}")


@dataclass(kw_only=True)
class FixedCacheConfig(CacheConfig):
    """Residual reuse on a fixed schedule: uniform (``interval``) or an explicit per-step list or file.

    Exactly one source of the schedule is used: ``schedule_file`` if given, else ``schedule``, else
    ``interval``.
    """

    scheduler: ClassVar[str] = "fixed"

    interval: int = 2
    """Compute every ``interval``-th step after the warm-up (1 computes every step)."""
    schedule: list[int] | None = None
    """Per-step list, 1 = compute, 0 = reuse; resampled to the run's step count when lengths differ."""
    schedule_file: str | Path | None = None
    """A schedule JSON written by ``dit-accel calibrate`` (its ``schedule``; values 2 count as 1 here)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("interval", self.interval, 1)
        if self.schedule is not None:
            _check_schedule("schedule", self.schedule, (0, 1))
            self.schedule = list(self.schedule)


@dataclass(kw_only=True)
class ProbeCacheConfig(CacheConfig):
    """First-block probe with an accumulated relative-error budget (FBCache/TeaCache family).

    The first ``head_blocks`` blocks (the probe, at least 1) run at every step. The relative L1 change
    of their residual against the previous step's, ``mean|p_t - p_{t-1}| / mean|p_{t-1}|``, is added to
    an accumulator per branch; the span is reused while the accumulator stays below ``threshold`` and
    the accumulator restarts at 0 whenever the span is computed.
    """

    scheduler: ClassVar[str] = "probe"

    head_blocks: int = 1
    """Number of probe blocks (computed at every step); at least 1."""
    threshold: float = 0.1
    """Budget of accumulated relative L1 change of the probe residual before the span is recomputed."""
    probe_token_stride: int = 1
    """Compare every ``probe_token_stride``-th token only (smaller saved probe; 1 = all tokens)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("head_blocks", self.head_blocks, 1)
        _check_float("threshold", self.threshold, 0.0)
        _check_int("probe_token_stride", self.probe_token_stride, 1)


@dataclass(kw_only=True)
class TaylorCacheConfig(FixedCacheConfig):
    """Fixed schedule whose reused steps forecast the span residual with a Taylor expansion.

    The derivatives are divided differences of the residuals of the last computed steps, in units of
    step index (Newton form, exact for polynomial residuals): order 1 keeps the residual and one
    difference (two stream-size tensors per branch), order 2 a second difference too (three: the one
    documented exception to the two-tensor memory rule).
    """

    scheduler: ClassVar[str] = "taylor"

    order: int | None = 1
    """Taylor order of the forecast: 1 (linear) or 2 (quadratic)."""

    def __post_init__(self) -> None:
        if self.order not in (1, 2) or isinstance(self.order, bool):
            raise ValueError(f"order must be 1 or 2, got {self.order!r}")
        super().__post_init__()


@dataclass(kw_only=True)
class ProCacheConfig(CacheConfig):
    """ProCache-style: an offline-searched non-uniform schedule plus selective recomputation.

    Schedule values per step: 1 = compute all blocks, 0 = reuse the whole span, 2 = *selective*:
    reuse the span up to the last ``selective_blocks`` blocks and recompute those deep blocks, which
    also refreshes the cached whole-span residual; with ``selective_tokens`` > 0 the tokens whose
    features changed most are recomputed through the reused part too. The schedule comes from ``schedule_file`` (written by
    ``dit-accel calibrate``), else from ``schedule``, else a built-in non-uniform pattern with compute
    fraction ``budget`` (dense early and late, sparse in the middle).
    """

    scheduler: ClassVar[str] = "procache"

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
    for the same budget spent on full steps, ``caching_compare.json``)."""
    selective_tokens: float | None = None
    """Share of the tokens (in [0, 1]) that selective (value 2) steps recompute through the reused front
    span (the span minus its deep blocks): per batch row, the tokens whose span input changed most since
    their cached residual was computed (change measured on a 32-dimensional random sketch of each token).
    Their fresh outputs replace the reused ones and refresh their rows of the cached residual; the other
    tokens reuse it. Self-attention of the recomputed tokens sees only the recomputed tokens (cost:
    share x the linear layers, share^2 x the attention). 0: off (selective steps recompute the deep blocks
    only); 1: the front span is computed in full. ``None``: the schedule file's ``selective_tokens``, 0
    without a file. Needs blocks whose text stream is separate (cross-attention families: Wan, LTX,
    PixArt); joint-attention blocks raise. Measured on the trained testbed (H100, 16 prompts,
    ``benchmarks/results/caching_compare.json``, ``procache_tok``): 25 % of the tokens on a quarter of
    the budget *lowered* PSNR vs spending it on full steps (26.6 vs 35.5 dB at 50 % compute, 27.5 vs
    28.9 at 35 %): the recomputed tokens lose the attention context of the others. Off by default and
    in every preset."""
    order: int | None = None
    """Forecast order (see :class:`CacheConfig`); ``None``: the schedule file's ``forecast_order`` (the
    order its search assumed), 0 without a file."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_float("budget", self.budget, 0.0, 1.0, low_open=True)
        _check_int("selective_blocks", self.selective_blocks, 0)
        if self.selective_tokens is not None:
            _check_float("selective_tokens", self.selective_tokens, 0.0, 1.0)
        if self.target == "output" and (self.selective_blocks or self.selective_tokens):
            raise ValueError("target='output' has no selective steps; set selective_blocks=0 and selective_tokens=0")
        if self.schedule is not None:
            _check_schedule("schedule", self.schedule, (0, 1, 2))
            self.schedule = list(self.schedule)


CONFIG_CLASSES: dict[str, type[CacheConfig]] = {
    cls.scheduler: cls for cls in (FixedCacheConfig, ProbeCacheConfig, TaylorCacheConfig, ProCacheConfig)
}
"""Config class per scheduler name."""

