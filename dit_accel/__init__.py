"""dit-accel: training-free acceleration for diffusion transformers on diffusers.

Public surface::

    import dit_accel
    handle = dit_accel.apply(pipe, preset="dense")          # or attention="full", cache=None
    pipe.transformer.set_attn_processor(dit_accel.processors_for(pipe.transformer, method="dense"))
    dit_accel.remove(pipe)
    dit_accel.calibrate(pipe, prompts, target_psnr=30, out="preset.json")   # then apply(pipe, preset="preset.json")

The names below are imported on first use (PEP 562), so ``import dit_accel.cli`` or
``import dit_accel.presets`` does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dit_accel.api import AccelHandle, apply, available_caches, get_handle, processors_for, remove
    from dit_accel.calibration.target import calibrate
    from dit_accel.attention.dense import dense_backend_name, dense_probe_report
    from dit_accel.attention.base import AttentionMethod
    from dit_accel.attention.registry import available_methods, get_method, register_method
    from dit_accel.pipelines.families import family_names, supported_transformer_classes

_PUBLIC: dict[str, str] = {
    "AccelHandle": "dit_accel.api",
    "apply": "dit_accel.api",
    "available_caches": "dit_accel.api",
    "get_handle": "dit_accel.api",
    "processors_for": "dit_accel.api",
    "remove": "dit_accel.api",
    "calibrate": "dit_accel.calibration.target",
    "dense_backend_name": "dit_accel.attention.dense",
    "dense_probe_report": "dit_accel.attention.dense",
    "AttentionMethod": "dit_accel.attention.base",
    "available_methods": "dit_accel.attention.registry",
    "get_method": "dit_accel.attention.registry",
    "register_method": "dit_accel.attention.registry",
    "family_names": "dit_accel.pipelines.families",
    "supported_transformer_classes": "dit_accel.pipelines.families",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dit_accel' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
