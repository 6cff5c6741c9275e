"""The quality knob of the sparse methods: one number in [0, 1] (or a level name) that sets every threshold.

``quality`` maps to the thresholds through :data:`QUALITY_ANCHORS`, a small table interpolated linearly; a
threshold set explicitly in a method's config wins over the knob. The table is data, re-fitted on the testbed
with ``benchmarks/sparse_quality.py``.
"""

from __future__ import annotations

import functools

QUALITY_LEVELS: dict[str, float] = {"max": 1.0, "quality": 0.8, "balanced": 0.6, "fast": 0.4, "turbo": 0.2}
"""Named quality levels and the knob value each one stands for."""

# Source: the testbed GPU sweep benchmarks/results/sparse_quality_gpu_run2.json (16 held-out prompts, 16,384
# tokens, 20 steps; dense warm-up 15 % + first layer + last step; only top_p varied, every other threshold at
# the values below). combo's PSNR vs dense (total density) per top_p:
#   0.97: 39.3 dB (0.850)   0.90: 33.0 (0.748)   0.80: 28.5 (0.664)   0.65: 25.2 (0.579)   0.50: 24.1 (0.515)
# (draft: 0.97: 41.6 (0.892), 0.90: 35.6 (0.801), 0.80: 30.8 (0.718), 0.65: 26.8 (0.625), 0.50: 24.5 (0.551)).
# top_p per level is interpolated on combo's curve for the PSNR targets max ~39, quality 35, balanced 32,
# fast 30, turbo 27 (draft, denser at equal top_p, lands 1-2 dB higher). The other thresholds were not varied,
# so they keep the measured values at every level.
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
``dense_warmup`` fraction of the denoising steps run dense. The knob values of the named levels are
:data:`QUALITY_LEVELS`."""


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
    return dict(knob_thresholds(quality_value(quality)))


@functools.lru_cache(maxsize=64)
def knob_thresholds(x: float) -> dict[str, float]:
    """The thresholds of knob value ``x`` in [0, 1]. Cached (a config reads a threshold several times per
    attention call): callers must not modify the returned dict (:func:`quality_thresholds` hands out copies)."""
    for (x0, lo), (x1, hi) in zip(QUALITY_ANCHORS, QUALITY_ANCHORS[1:]):
        if x0 <= x <= x1:
            t = (x - x0) / (x1 - x0)
            out = {key: lo[key] + t * (hi[key] - lo[key]) for key in lo}
            out["refresh_period"] = int(round(out["refresh_period"]))
            return out
    raise AssertionError("QUALITY_ANCHORS must span [0, 1]")
