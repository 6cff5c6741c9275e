"""V3 front-end: ``io.ComfyNode`` classes and the ``ComfyExtension`` ComfyUI loads via ``comfy_entrypoint``.

Imported only inside ComfyUI (it needs ``comfy_api.latest``).
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io

from dit_accel.comfy.nodes import CATEGORY, NODES, Field, NodeDef


def _input(f: Field) -> Any:
    if f.kind == "MODEL":
        return io.Model.Input(f.name, tooltip=f.tooltip)
    if f.kind == "COMBO":
        return io.Combo.Input(f.name, options=list(f.options), default=f.default, tooltip=f.tooltip)
    if f.kind == "STRING":
        return io.String.Input(f.name, default=f.default, multiline=f.multiline, tooltip=f.tooltip)
    if f.kind == "FLOAT":
        return io.Float.Input(f.name, default=f.default, min=f.minimum, max=f.maximum, step=f.step, tooltip=f.tooltip)
    if f.kind == "INT":
        return io.Int.Input(f.name, default=f.default, min=f.minimum, max=f.maximum, step=f.step, tooltip=f.tooltip)
    raise ValueError(f"unknown field kind {f.kind!r}")


def _v3_class(node: NodeDef) -> type[io.ComfyNode]:
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node.node_id,
            display_name=node.display_name,
            category=CATEGORY,
            description=node.description,
            inputs=[_input(f) for f in node.fields],
            outputs=[io.Model.Output(tooltip="The model with dit-accel installed (a clone; the input is unchanged).")],
        )

    def execute(cls, **kwargs: Any) -> io.NodeOutput:
        return io.NodeOutput(node.function(**kwargs))

    return type(node.node_id, (io.ComfyNode,), {
        "__doc__": node.description,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    })


NODE_CLASSES: list[type[io.ComfyNode]] = [_v3_class(node) for node in NODES]
"""The V3 node classes."""


class DitAccelExtension(ComfyExtension):
    """The dit-accel node pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The V3 node classes."""
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> DitAccelExtension:
    """What ComfyUI's custom-node loader calls."""
    return DitAccelExtension()
