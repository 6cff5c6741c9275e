"""Preset files: a preset calibrated to one model (``dit-accel calibrate --target-psnr``), stored as JSON.

``dit_accel.apply(pipe, preset="file.json")`` and ``dit-accel generate --preset file.json`` load one. A file is
tied to the model configuration it was calibrated on: :func:`model_config_hash` of the pipeline's transformers
(their classes and configs, names and paths left out) must equal the file's, else loading fails naming both
hashes. Format (``format: "dit-accel-preset"``, ``version: 1``)::

    {
      "format": "dit-accel-preset", "version": 1,
      "name": "testbed-30db",
      "model": {"id": "testbed", "pipeline": "TestbedPipeline",
                "transformers": {"transformer": "WanTransformer3DModel"}, "config_hash": "1f0c..."},
      "device": "cpu", "versions": {...},
      "target_psnr": 30.0,
      "calibration": {"prompts": [...], "num_steps": 8, "call": {"height": 128, ...}, "seed": 0, ...},
      "measured": {"psnr": 31.2, "psnr_per_prompt": [...], "modelled_cost": 0.61, ...},
      "settings": {"attention": "combo", "attention_config": {...}, "cache": "procache", "cache_config": {...}},
      "search": {"evaluated": [...], "interrupted": false, ...},
      "timing": {"speedup": 1.4, "dense_s": ..., "preset_s": ..., "search_s": ...},
      "created": "2026-12-05T10:00:00Z"
    }

:data:`TIMING_FIELDS` are the fields that hold wall-clock measurements: two searches with the same seed on the
same machine write files equal in everything else (:func:`without_timing`). Infinite floats (``skip_threshold``
``-inf``) are written as the strings ``"-inf"`` / ``"inf"`` so that the file is strict JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from dit_accel.presets import Preset

PRESET_FILE_FORMAT = "dit-accel-preset"
"""Value of the ``format`` key of a preset file."""

PRESET_FILE_VERSION = 1
"""Current preset file version."""

TIMING_FIELDS = ("timing", "created")
"""Top-level fields holding wall-clock measurements (they differ between two runs of the same search)."""

TRANSFORMER_ATTRS = ("transformer", "transformer_2")
"""Pipeline attributes holding transformers (the same list as ``dit_accel.api``)."""


def transformers_of(pipe_or_transformer: Any) -> dict[str, Any]:
    """The transformers of a pipeline by attribute name (a bare module counts as ``"transformer"``)."""
    import torch

    if isinstance(pipe_or_transformer, torch.nn.Module):
        return {"transformer": pipe_or_transformer}
    found = {n: getattr(pipe_or_transformer, n, None) for n in TRANSFORMER_ATTRS}
    found = {n: t for n, t in found.items() if t is not None}
    if not found:
        raise ValueError(f"{type(pipe_or_transformer).__name__} has no transformer (looked for {list(TRANSFORMER_ATTRS)})")
    return found


def model_config_hash(pipe_or_transformer: Any) -> str:
    """SHA-256 (16 hex digits) of the transformers' classes and configurations (keys starting with ``_``, such
    as the weights path and the diffusers version, left out): equal for the same architecture and sizes."""
    parts = []
    for name, transformer in transformers_of(pipe_or_transformer).items():
        config = {k: v for k, v in dict(getattr(transformer, "config", {})).items() if not k.startswith("_")}
        parts.append([name, type(transformer).__name__, config])
    text = json.dumps(parts, sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_floats(value: Any) -> Any:
    """``value`` with infinite floats replaced by ``"inf"`` / ``"-inf"`` (strict JSON)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: encode_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode_floats(v) for v in value]
    return value


def decode_floats(value: Any) -> Any:
    """Inverse of :func:`encode_floats`."""
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_floats(v) for v in value]
    return value


def is_preset_file(preset: Any) -> bool:
    """Whether ``apply``'s ``preset`` argument names a file (a ``Path``, or a string ending in ``.json``)."""
    return isinstance(preset, Path) or (isinstance(preset, str) and preset.lower().endswith(".json"))


def validate_preset_data(data: Any, source: str) -> dict[str, Any]:
    """Check a loaded preset file; raises ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != PRESET_FILE_FORMAT:
        raise ValueError(f"{source}: 'format' must be {PRESET_FILE_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != PRESET_FILE_VERSION:
        raise ValueError(f"{source}: unsupported version {data.get('version')!r}; supported: {PRESET_FILE_VERSION}")
    settings = data.get("settings")
    if not isinstance(settings, dict) or not {"attention", "attention_config", "cache", "cache_config"} <= set(settings):
        raise ValueError(f"{source}: 'settings' must hold attention, attention_config, cache and cache_config")
    model = data.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("config_hash"), str):
        raise ValueError(f"{source}: 'model' must hold the model's config_hash")
    return data


def read_preset_file(path: str | Path) -> dict[str, Any]:
    """Read and validate a preset file (no model check; see :func:`load_preset_file`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"preset file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"preset file {str(path)!r} is not valid JSON: {err}") from None
    return validate_preset_data(data, f"preset file {str(path)!r}")


def preset_of(data: dict[str, Any], source: str) -> Preset:
    """The :class:`Preset` a validated preset file describes (named after the file's ``name``)."""
    settings = decode_floats(data["settings"])
    return Preset(
        name=str(data.get("name") or Path(source).stem),
        version=int(data["version"]),
        attention=settings["attention"],
        attention_config=dict(settings["attention_config"] or {}),
        cache=settings["cache"],
        cache_config=dict(settings["cache_config"] or {}),
        description=f"calibrated to {data.get('target_psnr')} dB on {data['model'].get('id')} ({source})",
    )


def load_preset_file(path: str | Path, pipe_or_transformer: Any) -> Preset:
    """The preset of file ``path`` for ``pipe_or_transformer``; ``ValueError`` when the file was calibrated on
    another model configuration (naming both hashes) or is malformed."""
    data = read_preset_file(path)
    have = model_config_hash(pipe_or_transformer)
    want = data["model"]["config_hash"]
    if have != want:
        model = data["model"]
        raise ValueError(
            f"preset file {str(path)!r} was calibrated for another model configuration: file config_hash {want} "
            f"({model.get('id')}, {model.get('transformers')}), this pipeline's is {have} "
            f"({ {n: type(t).__name__ for n, t in transformers_of(pipe_or_transformer).items()} }); "
            "calibrate this model with `dit-accel calibrate --target-psnr`"
        )
    return preset_of(data, str(path))


def without_timing(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without :data:`TIMING_FIELDS` (what two runs with the same seed must agree on)."""
    return {k: v for k, v in data.items() if k not in TIMING_FIELDS}


def save_preset_file(data: dict[str, Any], path: str | Path) -> Path:
    """Validate and write a preset file atomically (strict JSON, infinite floats as strings)."""
    path = Path(path)
    data = encode_floats(data)
    validate_preset_data(data, f"preset file {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
