"""Named, versioned speed presets.

A preset is data: which attention method and which cache scheduler to install, with their
configuration. `dit_accel.apply(pipe, preset="...")` resolves the name here; explicit
`attention=` / `cache=` arguments override the preset's fields.

Presets are versioned so that a result names the recipe it measured ("balanced@4 gave 31.2 dB"): any
change of a preset's methods or thresholds bumps its version. A package ships one version of each preset;
``get_preset("balanced@4")`` pins it (an older tag is refused, naming the current one), and the CHANGELOG
says what each version changed.
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


_COMBO: dict[str, Any] = {"drift_check": False, "skip_threshold": float("-inf"), "dense_above": "auto",
                          "precision": "bf16"}
"""The sparse attention of every preset: combo with the plan reused between refreshes (no drift check and no tile
statistics: they cost the kernel 13-16 % and skipped 0-3 tiles a run on the testbed), break-even routing by the
device's cost model (a head whose planned density would not beat dense attention runs dense), the kernel in bf16
(no preset switches to fp8 before the testbed fp8 criteria are measured on a GPU)."""

_CACHE_GUARDS: dict[str, Any] = {"selective_blocks": 0, "warmup_steps": 2, "final_steps": 0, "max_consecutive_reuse": 3}
"""ProCache's guardrails in every preset: two computed warm-up steps, at most three reused steps in a row."""

# The cache schedules: the exact schedule search (`dit-accel calibrate --budget B` at 20 steps; resampled for other
# step counts) on the testbed, with the forecast order it found best. Why these presets: at the testbed's size the
# cache gives the speed and the sparse attention is about neutral (planning costs about what the kernel saves at the
# planned densities), so each faster preset computes fewer steps and plans sparser attention on the steps it
# computes; the quality bars come from adding the two parts' measured errors. The fit, its inputs and its predicted
# speed and PSNR per preset are written by benchmarks/presets_fit.py (predicted, not measured on a GPU).
_SCHEDULE_65: dict[str, Any] = {"schedule": [1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0], "order": 1}
"""65 % of the block evaluations, linear forecast on reused steps."""
_SCHEDULE_50: dict[str, Any] = {"schedule": [1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 0], "order": 1}
"""50 %, linear forecast (the search's schedule refined by real runs)."""
_SCHEDULE_40: dict[str, Any] = {"schedule": [1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0], "order": 1}
"""40 %, linear forecast."""
_SCHEDULE_35: dict[str, Any] = {"schedule": [1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0], "order": 0}
"""35 %, plain reuse (the search's schedule refined by real runs)."""


_PRESETS: dict[str, Preset] = {
    p.name: _freeze(p)
    for p in (
        Preset(
            name="dense",
            version=1,
            attention="dense",
            description="Our processors with exact dense attention (fastest available SDPA backend); the baseline.",
        ),
        Preset(
            name="quality",
            version=4,
            attention="combo",
            attention_config=_COMBO | {"quality": "max"},
            cache="procache",
            cache_config=_CACHE_GUARDS | _SCHEDULE_65,
            description="Closest to dense (~35 dB on the testbed): near-lossless sparse attention where it beats dense, ProCache on two thirds of the steps.",
        ),
        Preset(
            name="balanced",
            version=4,
            attention="combo",
            attention_config=_COMBO | {"quality": "quality"},
            cache="procache",
            cache_config=_CACHE_GUARDS | _SCHEDULE_50,
            description="Sparse attention where it beats dense plus ProCache on half the steps (~30 dB or more on the testbed).",
        ),
        Preset(
            name="fast",
            version=4,
            attention="combo",
            attention_config=_COMBO | {"quality": "balanced"},
            cache="procache",
            cache_config=_CACHE_GUARDS | _SCHEDULE_40,
            description="Sparser attention where it beats dense plus ProCache on 40 % of the steps.",
        ),
        Preset(
            name="turbo",
            version=4,
            attention="combo",
            attention_config=_COMBO | {"quality": "fast"},
            cache="procache",
            cache_config=_CACHE_GUARDS | _SCHEDULE_35,
            description="Aggressive: the sparsest attention plans and ProCache computing about a third of the steps (visible quality loss likely).",
        ),
    )
}


def preset_names() -> list[str]:
    """Names of all shipped presets, in definition order."""
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` or tagged ``name@version`` (the shipped version only); raise
    ``ValueError`` listing the valid names, or naming the shipped version of a preset asked at another one."""
    if not isinstance(name, str):
        raise TypeError(f"preset must be a str, got {type(name).__name__}: {name!r}; valid presets: {preset_names()}")
    base, at, version = name.partition("@")
    preset = _PRESETS.get(base)
    if preset is None:
        raise ValueError(f"unknown preset {name!r}; valid presets: {preset_names()}")
    if at and version != str(preset.version):
        raise ValueError(f"preset {name!r} is not shipped by this dit-accel: it ships {preset.tag} "
                         "(CHANGELOG.md says what each version changed)")
    return preset
