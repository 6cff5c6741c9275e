"""dit-accel: training-free acceleration for diffusion transformers on diffusers.

Public surface::

    import dit_accel
    handle = dit_accel.apply(pipe, preset="dense")          # or attention="full", cache=None
    pipe.transformer.set_attn_processor(dit_accel.processors_for(pipe.transformer, method="dense"))
    dit_accel.remove(pipe)
    dit_accel.calibrate(pipe, prompts, target_psnr=30, out="preset.json")   # then apply(pipe, preset="preset.json")
"""

from typing import Any

from dit_accel.api import AccelHandle, apply, available_caches, get_handle, processors_for, remove
from dit_accel.attention.dense import dense_backend_name, dense_probe_report
from dit_accel.attention.base import AttentionMethod
from dit_accel.attention.registry import available_methods, get_method, register_method
from dit_accel.pipelines.families import family_names, supported_transformer_classes

def calibrate(pipe: Any, prompts: Any, *, target_psnr: float, **options: Any) -> dict:
    """Search the fastest sparse-attention and cache configuration of ``pipe`` that keeps ``target_psnr`` dB
    against dense on ``prompts``, timed on this device, and return (and with ``out=`` write) a preset file that
    ``apply(pipe, preset="file.json")`` loads. Options: see
    :func:`dit_accel.calibration.target.calibrate_to_target`."""
    from dit_accel.calibration.target import calibrate_to_target

    return calibrate_to_target(pipe, prompts, target_psnr=target_psnr, **options)


__all__ = [
    "AccelHandle",
    "AttentionMethod",
    "apply",
    "calibrate",
    "available_caches",
    "available_methods",
    "dense_backend_name",
    "dense_probe_report",
    "family_names",
    "get_handle",
    "get_method",
    "processors_for",
    "register_method",
    "remove",
    "supported_transformer_classes",
]
