"""Named, versioned speed presets.

A preset is data: which attention method and which cache scheduler to install, with their
configuration. `dit_accel.apply(pipe, preset="...")` resolves the name here; explicit
`attention=` / `cache=` arguments override the preset's fields.

Presets are versioned so that a result ("balanced@1 gave 31.2 dB") stays reproducible when a
preset's thresholds are re-calibrated later: a change of thresholds bumps the version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class Preset:
    """One named acceleration recipe."""

    name: str
    """Preset name as users type it (``dit-accel generate --preset NAME``)."""
    version: int
    """Bumped whenever the preset's methods or thresholds change."""
    attention: str | None
    """Attention method name (see ``dit_accel.attention.registry``); ``None`` keeps the model's stock processors."""
    attention_config: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the attention method's config dataclass."""
    cache: str | None = None
    """Feature-cache scheduler name; ``None`` computes every block at every step."""
    cache_config: Mapping[str, Any] = field(default_factory=dict)
    """Keyword arguments for the cache scheduler's config dataclass."""
    description: str = ""
    """One line for ``dit-accel presets`` and the docs."""

    @property
    def tag(self) -> str:
        """``name@version``, the string recorded in run logs and reports."""
        return f"{self.name}@{self.version}"


def _freeze(preset: Preset) -> Preset:
    # Presets are shared module-level data: make their config mappings read-only so a caller
    # cannot silently change a preset for everybody else in the process.
    return Preset(
        name=preset.name,
        version=preset.version,
        attention=preset.attention,
        attention_config=MappingProxyType(dict(preset.attention_config)),
        cache=preset.cache,
        cache_config=MappingProxyType(dict(preset.cache_config)),
        description=preset.description,
    )


_COMBO_REUSE: dict[str, Any] = {"drift_check": False, "skip_threshold": float("-inf")}
"""Combo with the plan reused between refreshes: no drift check and no tile statistics (they cost the kernel
13-16 % and skipped 0-3 tiles a run on the testbed)."""

_PROCACHE_HALF: dict[str, Any] = {
    "schedule": [1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0],
    "order": 1, "selective_blocks": 0, "warmup_steps": 2, "final_steps": 0, "max_consecutive_reuse": 3,
}
"""ProCache at 50 % of block evaluations: the schedule `dit-accel calibrate --budget 0.5` finds on the testbed
at 20 steps (resampled for other step counts), linear forecast on reused steps."""

_PROCACHE_THIRD: dict[str, Any] = {
    "schedule": [1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0],
    "order": 0, "selective_blocks": 0, "warmup_steps": 2, "final_steps": 0, "max_consecutive_reuse": 3,
}
"""ProCache at 35 % of block evaluations: the schedule of `dit-accel calibrate --budget 0.35` on the testbed at
20 steps, plain reuse."""


_PRESETS: dict[str, Preset] = {
    p.name: _freeze(p)
    for p in (
        Preset(
            name="dense",
            version=1,
            attention="dense",
            description="Our processors with exact dense attention (fastest available SDPA backend); the baseline.",
        ),
        # Why these settings. The sparse presets run combo at the quality knob's level (attention/quality.py)
        # with the plan reused between refreshes (every 5 computed calls; no drift check, no tile statistics):
        # planning every call is slower than cuDNN at Wan2.1-1.3B 480p (0.85x / 0.94x for quality / balanced),
        # reuse gives 0.99x / 1.10x there and 1.16x / 1.27x at 14B 720p. The cache is ProCache on calibrated
        # schedules, the best scheduler on the testbed: at 50 % of block evaluations 35.5 dB (taylor 29.5, the
        # best peer 30.3: cache-dit DBCache), at 35 % 28.9 dB (25.1, 25.9: diffusers TaylorSeer); with sparse
        # attention on top 33.3 dB (50 % + combo 0.8) and 26.8 dB (35 % + combo 0.6).
        Preset(
            name="quality",
            version=3,
            attention="combo",
            attention_config=_COMBO_REUSE | {"quality": "quality"},
            description="3D-tile permuted block-sparse attention, draft-planned every 5th call (~35 dB on the testbed); no feature caching.",
        ),
        Preset(
            name="balanced",
            version=3,
            attention="combo",
            attention_config=_COMBO_REUSE | {"quality": "balanced"},
            cache="procache",
            cache_config=_PROCACHE_HALF,
            description="Permuted block-sparse attention planned every 5th call plus ProCache reuse of the blocks on half the steps.",
        ),
        Preset(
            name="fast",
            version=3,
            attention="combo",
            attention_config=_COMBO_REUSE | {"quality": "fast"},
            cache="procache",
            cache_config=_PROCACHE_HALF,
            description="Sparser permuted block-sparse attention planned every 5th call plus ProCache reuse on half the steps.",
        ),
        Preset(
            name="turbo",
            version=3,
            attention="combo",
            attention_config=_COMBO_REUSE | {"quality": "turbo"},
            cache="procache",
            cache_config=_PROCACHE_THIRD,
            description="Aggressive: the sparsest attention plans and ProCache computing about a third of the steps (visible quality loss likely).",
        ),
    )
}


def preset_names() -> list[str]:
    """Names of all shipped presets, in definition order."""
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    """Return the preset called ``name``; raise ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"preset must be a str, got {type(name).__name__}: {name!r}; valid presets: {preset_names()}")
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {preset_names()}") from None
