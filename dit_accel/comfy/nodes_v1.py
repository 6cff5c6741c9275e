"""V1 front-end (``NODE_CLASS_MAPPINGS``) for ComfyUI versions without ``comfy_api``.

One class per :data:`dit_accel.comfy.nodes.NODES` entry, with ``INPUT_TYPES`` built from its fields.
"""

from __future__ import annotations

from typing import Any

from dit_accel.comfy.nodes import CATEGORY, NODES, Field, NodeDef


def _input_type(f: Field) -> tuple:
    if f.kind == "MODEL":
        return ("MODEL", {"tooltip": f.tooltip})
    if f.kind == "COMBO":
        return (list(f.options), {"default": f.default, "tooltip": f.tooltip})
    spec: dict[str, Any] = {"default": f.default, "tooltip": f.tooltip}
    if f.kind == "STRING":
        spec["multiline"] = f.multiline
    else:
        spec.update({k: v for k, v in (("min", f.minimum), ("max", f.maximum), ("step", f.step)) if v is not None})
    return (f.kind, spec)


def _v1_class(node: NodeDef) -> type:
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:  # noqa: N802 - ComfyUI's name
        return {"required": {f.name: _input_type(f) for f in node.fields}}

    def run(self, **kwargs: Any) -> tuple[Any]:
        return (node.function(**kwargs),)

    return type(node.node_id, (), {
        "__doc__": node.description,
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "RETURN_TYPES": ("MODEL",),
        "FUNCTION": "run",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": node.description,
        "run": run,
    })


NODE_CLASS_MAPPINGS: dict[str, type] = {node.node_id: _v1_class(node) for node in NODES}
"""Node id -> V1 node class."""
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {node.node_id: node.display_name for node in NODES}
"""Node id -> display name."""
