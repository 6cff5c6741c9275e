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
    """Attention method name (see ``dit_accel.attention.methods``); ``None`` keeps the model's stock processors."""
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
13-16 % and skipped 0-3 tiles a run on the testbed; sparse_NOTES.md)."""

_PROCACHE_HALF: dict[str, Any] = {
    "schedule": [1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0],
    "order": 1, "selective_blocks": 0, "warmup_steps": 2, "final_steps": 0, "max_consecutive_reuse": 3,
}
"""ProCache at 50 % of block evaluations: the schedule `dit-accel calibrate --budget 0.5` found on the testbed
at 20 steps (benchmarks/results/caching_schedule_testbed_20steps_b0.50.json), linear forecast on reused steps."""

_PROCACHE_THIRD: dict[str, Any] = {
    "schedule": [1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0],
    "order": 0, "selective_blocks": 0, "warmup_steps": 2, "final_steps": 0, "max_consecutive_reuse": 3,
}
"""ProCache at 35 % of block evaluations (caching_schedule_testbed_20steps_b0.35.json), plain reuse."""


_PRESETS: dict[str, Preset] = {
    p.name: _freeze(p)
    for p in (
        Preset(
            name="dense",
            version=1,
            attention="dense",
            description="Our processors with exact dense attention (fastest available SDPA backend); the baseline.",
        ),
        # Version 2 (session 2): the sparse settings use the quality knob as fitted on the testbed GPU sweep
        # (sparse_base.QUALITY_ANCHORS; benchmarks/results/sparse_quality_gpu_run2.json, 16 prompts, 16,384
        # tokens, 20 steps; at the knob's top_p the draft family measured ~35-36 dB at total density ~0.79
        # (quality, top_p 0.92), ~33 dB at ~0.76 (balanced, 0.88), ~30 dB at ~0.70 (fast, 0.835), ~27 dB at
        # ~0.63 (turbo, 0.74)). Every sparse preset runs combo with the plan reused between refreshes (every
        # 5 computed calls; no drift check, no tile statistics): planning every call made quality/balanced
        # slower than cuDNN at Wan2.1-1.3B 480p (0.85x / 0.94x, sparse_speed_gpu.json), reuse gives
        # 0.99x / 1.10x there and 1.16x / 1.27x at 14B 720p.
        # Version 3 (session 2): the cache is ProCache on the schedules `dit-accel calibrate` found on the
        # testbed (20 steps; resampled for other step counts), replacing `taylor`, our weakest scheduler there:
        # at 50 % of block evaluations 35.5 dB vs taylor's 29.5 and the best peer's 30.3 (cache-dit DBCache);
        # at 35 % 28.9 dB vs 25.1 and 25.9 (diffusers TaylorSeer); caching_compare.json, 16 prompts. With
        # sparse attention on top: 33.3 dB at 50 % + combo 0.8, 26.8 dB at 35 % + combo 0.6
        # (combined_quality.json, 8 prompts). The presets as a whole are measured in
        # benchmarks/results/presets_gpu/ (dense vs each preset, same seeds).
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
