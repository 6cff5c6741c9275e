"""What the sparse attention methods share: the quality knob, the safety valves, the config base
class and the method base class that turns a typed config dataclass into registry options.

Every sparse method (``draft``, ``permuted``, ``temporal_skip``, ``combo``, ``oracle``, ``window``)
is configured by a frozen dataclass deriving from :class:`SparseConfig`. ``get_method(name, **opts)``
passes ``opts`` to the method's constructor; :class:`ConfiguredMethod` gives each subclass a
keyword-only constructor signature generated from its config dataclass, so the registry lists and
checks the dataclass fields, and there is one source of truth per option.

The quality knob: ``quality`` is a float in [0, 1] (1 = closest to dense) or a named level
(:data:`QUALITY_LEVELS`). It maps to the thresholds through :data:`QUALITY_ANCHORS`, a small table
interpolated linearly; a threshold set explicitly in the config wins over the knob. The table is
data, to be re-calibrated on the testbed (``benchmarks/sparse_quality.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from dit_accel.attention.methods import DEFAULT_MIN_SEQ_LEN, AttentionMethod

if TYPE_CHECKING:
    from dit_accel.context import AttentionCall, TokenLayout

BLOCK = 128
"""Kernel block size (query and key) the sparse methods plan for."""

QUALITY_LEVELS: dict[str, float] = {"max": 1.0, "quality": 0.8, "balanced": 0.6, "fast": 0.4, "turbo": 0.2}
"""Named quality levels and the knob value each one stands for."""

# Fitted on the testbed GPU sweep sparse_quality_gpu_run2.json (H100, 2026-11-22; 16 held-out prompts,
# 256x256 px x 16 frames = 16,384 tokens, 20 steps, dense warm-up 15 % + first layer + last step; every
# point at min_blocks_fraction 0.06, similarity_threshold 0.30, skip_threshold -12.8, refresh_period 5,
# drift_tolerance 0.044, only top_p varied). combo's PSNR vs dense (total density) per top_p:
#   0.97: 39.3 dB (0.850)   0.90: 33.0 (0.748)   0.80: 28.5 (0.664)   0.65: 25.2 (0.579)   0.50: 24.1 (0.515)
# (draft: 0.97: 41.6 (0.892), 0.90: 35.6 (0.801), 0.80: 30.8 (0.718), 0.65: 26.8 (0.625), 0.50: 24.5 (0.551)).
# top_p per level is interpolated on combo's curve for the PSNR targets max ~39, quality 35, balanced 32,
# fast 30, turbo 27 (draft, denser at equal top_p, lands 1-2 dB higher). The other thresholds were not
# varied in the sweep, so they stay at the measured values for every level.
_MEASURED = {"min_blocks_fraction": 0.06, "similarity_threshold": 0.30, "skip_threshold": -12.8,
             "refresh_period": 5, "drift_tolerance": 0.044, "dense_warmup": 0.15}
QUALITY_ANCHORS: tuple[tuple[float, dict[str, float]], ...] = (
    (0.0, {"top_p": 0.60, **_MEASURED}),
    (0.2, {"top_p": 0.74, **_MEASURED}),
    (0.4, {"top_p": 0.835, **_MEASURED}),
    (0.6, {"top_p": 0.88, **_MEASURED}),
    (0.8, {"top_p": 0.92, **_MEASURED}),
    (1.0, {"top_p": 0.97, **_MEASURED}),
)
"""Knob value -> thresholds, interpolated linearly between anchors (integers rounded). Meanings:
``top_p`` share of the (estimated) attention mass kept per query block; ``min_blocks_fraction`` least
fraction of key blocks per query block; ``similarity_threshold`` least mean cosine similarity of a
block's tokens to their mean for pooling to be trusted; ``skip_threshold`` natural-log tile statistic
below which a tile is skipped at later steps (its share of a row's mass is at most
``128 * exp(skip_threshold)``: -12 bounds it by 8e-4); ``refresh_period`` computed calls between two full
re-plans; ``drift_tolerance`` extra estimated mass outside the mask that triggers a re-plan of a row;
``dense_warmup`` fraction of the denoising steps run dense. Fitted on the testbed (see the comment above);
the knob values of the named levels are :data:`QUALITY_LEVELS`."""


def quality_value(quality: float | str) -> float:
    """The knob value in [0, 1] of ``quality`` (a float or a name of :data:`QUALITY_LEVELS`)."""
    if isinstance(quality, str):
        if quality not in QUALITY_LEVELS:
            raise ValueError(f"unknown quality level {quality!r}; allowed: {sorted(QUALITY_LEVELS)} or a float in [0, 1]")
        return QUALITY_LEVELS[quality]
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not (0.0 <= float(quality) <= 1.0):
        raise ValueError(f"quality must be a float in [0, 1] or one of {sorted(QUALITY_LEVELS)}, got {quality!r}")
    return float(quality)


def quality_thresholds(quality: float | str) -> dict[str, float]:
    """Thresholds for a quality knob value, interpolated in :data:`QUALITY_ANCHORS`."""
    return dict(_thresholds(quality_value(quality)))


@functools.lru_cache(maxsize=64)
def _thresholds(x: float) -> dict[str, float]:
    # Cached: SparseConfig.resolved reads a threshold several times per attention call. Callers must not
    # modify the returned dict (quality_thresholds hands out copies).
    for (x0, lo), (x1, hi) in zip(QUALITY_ANCHORS, QUALITY_ANCHORS[1:]):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0)
            out = {key: lo[key] + t * (hi[key] - lo[key]) for key in lo}
            out["refresh_period"] = int(round(out["refresh_period"]))
            return out
    raise AssertionError("QUALITY_ANCHORS must span [0, 1]")


def check_range(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, allow_none: bool = True,
                integer: bool = False) -> None:
    """Raise ValueError naming ``name``, ``value`` and the allowed range when ``value`` is outside it."""
    if value is None and allow_none:
        return
    kind = "an int" if integer else "a number"
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
    if bad_type or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be {kind} in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class SparseConfig:
    """Options shared by every sparse method: the quality knob and the dense safety valves."""

    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    """Self-attention calls shorter than this many tokens run dense without planning."""
    quality: float | str = "balanced"
    """One knob in [0, 1] (1 = closest to dense) or a level name (``max``, ``quality``, ``balanced``, ``fast``,
    ``turbo``); it sets every threshold left at ``None`` (see :data:`QUALITY_ANCHORS`)."""
    dense_warmup: float | None = None
    """Fraction of the denoising steps, from the first, run dense (``None``: from ``quality``). When the
    pipeline's step count is unknown, only step 0 counts as warm-up."""
    dense_first_layers: int = 1
    """The first this-many self-attention layers always run dense."""
    dense_last_step: bool = True
    """Run the last denoising step dense (needs the step count; ignored when it is unknown)."""

    def __post_init__(self) -> None:
        if isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int) or self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be an int >= 0, got {self.min_seq_len!r}")
        quality_value(self.quality)
        check_range("dense_warmup", self.dense_warmup, 0.0, 1.0)
        check_range("dense_first_layers", self.dense_first_layers, 0, 10**6, allow_none=False, integer=True)
        if not isinstance(self.dense_last_step, bool):
            raise ValueError(f"dense_last_step must be a bool, got {self.dense_last_step!r}")

    def resolved(self, name: str) -> Any:
        """The value of threshold ``name``: the field when set, else the quality knob's value."""
        value = getattr(self, name, None)
        return _thresholds(quality_value(self.quality))[name] if value is None else value


def warmup_steps(cfg: SparseConfig, num_steps: int | None) -> int:
    """Number of dense warm-up steps (the first ones) for a pipeline of ``num_steps`` steps; when the step
    count is unknown, 1 (step 0) if any warm-up is configured, else 0."""
    warm = cfg.resolved("dense_warmup")
    if num_steps is None:
        return 1 if warm > 0 else 0
    return math.ceil(warm * num_steps - 1e-9)


def safety_reason(cfg: SparseConfig, ctx: "AttentionCall") -> str | None:
    """Why this call must run dense by the safety valves (``"warmup"``, ``"first_layers"``,
    ``"last_step"``), or ``None``."""
    if ctx.layer < cfg.dense_first_layers:
        return "first_layers"
    if ctx.step < warmup_steps(cfg, ctx.num_steps):
        return "warmup"
    if ctx.num_steps is None:
        return None
    if cfg.dense_last_step and ctx.step >= ctx.num_steps - 1:
        return "last_step"
    return None


def add_call_stats(ctx: "AttentionCall", **values: Any) -> None:
    """Add keys to this call's statistics record (``route.attend`` merges them into the record).

    Values should be plain Python numbers, strings or bools; they are only kept when the
    transformer's statistics are enabled.
    """
    if ctx.context.stats_enabled:
        extra = ctx.__dict__.setdefault("extra_stats", {})
        extra.update(values)


def stats_enabled(ctx: "AttentionCall") -> bool:
    """Whether this call's statistics are recorded (computing them may synchronise with the GPU)."""
    return bool(ctx.context.stats_enabled)


def text_token_mask(layout: "TokenLayout", seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool ``(seq_len,)``: True for the text tokens of a joint-attention sequence; ``None`` without text."""
    if layout.text_tokens <= 0:
        return None
    mask = torch.ones(seq_len, dtype=torch.bool, device=device)
    mask[layout.visual_slice(seq_len)] = False
    return mask


def text_blocks_of(layout: "TokenLayout", seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool ``(num_blocks,)``: True for the kernel blocks holding text tokens (``blocks_touching`` of
    :func:`text_token_mask`); ``None`` without text. Cached per layout, length and device (treat it as
    read-only): the planning path asks for it at every call."""
    if layout.text_tokens <= 0:
        return None
    return _text_blocks(layout, seq_len, device)


@functools.lru_cache(maxsize=64)
def _text_blocks(layout: "TokenLayout", seq_len: int, device: torch.device) -> torch.Tensor:
    return blocks_touching(text_token_mask(layout, seq_len, device))


def blocks_touching(token_mask: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Bool ``(num_blocks,)``: True for the blocks of ``block`` tokens that hold any True token."""
    n = token_mask.shape[-1]
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.bool, device=token_mask.device)
    padded[:n] = token_mask
    return padded.view(nb, block).any(-1)


def branch_rows(ctx: "AttentionCall", batch: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Batch-row indices (int64) of each guidance branch of the call, in first-seen order, on ``device`` (CPU
    when ``None``). The tensors are cached per rows and device (treat them as read-only): indexing with them
    costs no host-to-device copy, which would synchronise with the GPU, at every call."""
    branches = ctx.branches if len(ctx.branches) == batch else ("cond",) * batch
    rows: dict[str, list[int]] = {}
    for i, b in enumerate(branches):
        rows.setdefault(b, []).append(i)
    return {b: _row_tensor(tuple(r), device) for b, r in rows.items()}


@functools.lru_cache(maxsize=256)
def _row_tensor(rows: tuple[int, ...], device: torch.device | None) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


class ConfiguredMethod(AttentionMethod):
    """Base class of the sparse methods: configured by one frozen dataclass (``config_class``).

    The constructor takes the dataclass fields as keyword-only options (``get_method("draft",
    top_p=0.9)``) or a ready config object (``DraftMethod(DraftConfig(top_p=0.9))``).
    """

    config_class: ClassVar[type[SparseConfig]] = SparseConfig
    """Dataclass holding this method's options."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        fields = [f for f in dataclasses.fields(cls.config_class) if f.init]
        params = [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
            inspect.Parameter("config", inspect.Parameter.POSITIONAL_ONLY, default=None),
        ]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else inspect.Parameter.empty
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))

        def __init__(self: ConfiguredMethod, config: SparseConfig | None = None, /, **options: Any) -> None:
            ConfiguredMethod._setup(self, config, options)

        __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        __init__.__doc__ = f"Options: the fields of :class:`{cls.config_class.__name__}`."
        cls.__init__ = __init__  # type: ignore[method-assign]

    def _setup(self, config: SparseConfig | None, options: dict[str, Any]) -> None:
        cls = self.config_class
        if config is not None:
            if options:
                raise ValueError(f"options {sorted(options)} given together with a config object {config!r}")
            if not isinstance(config, cls):
                raise TypeError(f"{type(self).__name__} needs a {cls.__name__}, got {type(config).__name__}")
            self.cfg = config
        else:
            allowed = sorted(f.name for f in dataclasses.fields(cls))
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for attention method {self.name!r}; allowed options: {allowed}")
            self.cfg = cls(**options)
        AttentionMethod.__init__(self, min_seq_len=self.cfg.min_seq_len)

    def config(self) -> dict[str, Any]:
        """The method's options (the config dataclass) as a plain dict."""
        return dataclasses.asdict(self.cfg)
