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


_PRESETS: dict[str, Preset] = {
    p.name: _freeze(p)
    for p in (
        Preset(
            name="dense",
            version=1,
            attention="dense",
            description="Our processors with exact dense attention (fastest available SDPA backend); the baseline.",
        ),
        # Version 1 of the accelerating presets is provisional: the sparse settings come from the first
        # GPU sweep on the testbed (benchmarks/results/sparse_quality_gpu_run1.md: draft at quality 1.0
        # kept 37.9 dB at 0.87 density), the cache settings are the schedulers' defaults, not yet
        # calibrated on the trained testbed. Re-calibration bumps the versions.
        Preset(
            name="quality",
            version=1,
            attention="draft",
            attention_config={"quality": 1.0},
            description="Draft-guided block-sparse attention at its most careful setting; no feature caching.",
        ),
        Preset(
            name="balanced",
            version=1,
            attention="draft",
            attention_config={"quality": 1.0},
            cache="taylor",
            cache_config={"interval": 2, "order": 1},
            description="Draft block-sparse attention plus block reuse every other step with a linear forecast.",
        ),
        Preset(
            name="fast",
            version=1,
            attention="combo",
            attention_config={"quality": 0.8},
            cache="taylor",
            cache_config={"interval": 2, "order": 1},
            description="Permuted + draft + temporal-skip attention, and block reuse every other step.",
        ),
        Preset(
            name="turbo",
            version=1,
            attention="combo",
            attention_config={"quality": 0.6, "drift_check": False},
            cache="taylor",
            cache_config={"interval": 3, "order": 1},
            description="Aggressive: sparser attention and block reuse two steps out of three (visible quality loss likely).",
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
