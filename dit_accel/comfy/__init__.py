"""ComfyUI node pack: dit-accel's sparse attention and feature cache on ComfyUI's own models.

Inside a ComfyUI with ``comfy_api`` this package exports ``comfy_entrypoint`` (V3 nodes); in an older
ComfyUI it exports ``NODE_CLASS_MAPPINGS`` (V1 nodes). ComfyUI finds the pack through a one-file shim
in ``custom_nodes`` (``python -m dit_accel.comfy.install --comfyui DIR`` writes it).

Modules: :mod:`~dit_accel.comfy.nodes` (what the nodes do, their inputs), :mod:`~dit_accel.comfy.patching`
(installation through ComfyUI's patching API), :mod:`~dit_accel.comfy.adapters` (one adapter per ComfyUI
model class), :mod:`~dit_accel.comfy.bridge` (the only module calling dit_accel's internals).
"""

from __future__ import annotations

try:
    from comfy_api.latest import ComfyExtension as _ComfyExtension  # noqa: F401 - probes for the V3 API
except ImportError:
    _HAS_V3 = False
else:
    _HAS_V3 = True

if _HAS_V3:
    from dit_accel.comfy.nodes_v3 import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
else:
    from dit_accel.comfy.nodes_v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
