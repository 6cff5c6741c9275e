"""dit-accel: training-free acceleration for diffusion transformers on diffusers.

Public surface::

    import dit_accel
    handle = dit_accel.apply(pipe, preset="dense")          # or attention="full", cache=None
    pipe.transformer.set_attn_processor(dit_accel.processors_for(pipe.transformer, method="dense"))
    dit_accel.remove(pipe)
"""

from dit_accel.api import AccelHandle, apply, available_caches, get_handle, processors_for, remove
from dit_accel.attention.dense import dense_backend_name, dense_probe_report
from dit_accel.attention.base import AttentionMethod
from dit_accel.attention.registry import available_methods, get_method, register_method
from dit_accel.pipelines.families import family_names, supported_transformer_classes

__all__ = [
    "AccelHandle",
    "AttentionMethod",
    "apply",
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
