"""What dit-accel knows about one model family: modules to patch, processor, inputs, CFG order."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from dit_accel.context import ForwardInputs


@dataclass(frozen=True)
class Family:
    """Adapter for one diffusers transformer family."""

    name: str
    """Short family name, e.g. ``"wan"``."""
    transformer_class: str
    """diffusers class name of the transformer, e.g. ``"WanTransformer3DModel"``."""
    cfg_style: Literal["sequential", "batched"]
    """How the family's pipelines run guidance: two calls per step (cond, then uncond) or one call
    with the batch ``[uncond rows, cond rows]``."""
    processor_cls: type
    """The dit-accel processor class (a subclass of the stock processor)."""
    self_attention: str
    """Regex (full match) on module names of self/joint-attention modules (sparse candidates)."""
    cross_attention: str | None
    """Regex on module names of cross-attention modules (dense, on the fastest backend); ``None`` if none."""
    read_inputs: Callable[[inspect.BoundArguments], ForwardInputs]
    """Reads batch, timestep, grid, patch size and text count from the transformer's bound forward arguments."""
    covers: str
    """One line: what the processor covers with the sparse path and what it hands to dense."""

    @property
    def stock_processor_cls(self) -> type:
        """The diffusers processor class ours subclasses (what the module must run before ``apply``)."""
        return next(c for c in self.processor_cls.__mro__ if c.__module__.startswith("diffusers."))

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, int]]:
        """``(name, module, role, layer)`` of every module we replace, in model order.

        Self-attention modules are numbered 0.. in order; a cross-attention module carries the index of
        the self-attention module of its block (the last one seen before it).
        """
        out = []
        layer = -1
        for name, module in transformer.named_modules():
            if not hasattr(module, "set_processor"):
                continue
            if re.fullmatch(self.self_attention, name):
                layer += 1
                out.append((name, module, "self", layer))
            elif self.cross_attention is not None and re.fullmatch(self.cross_attention, name):
                out.append((name, module, "cross", max(layer, 0)))
        return out


def arg(bound: inspect.BoundArguments, name: str):
    """A forward argument by name (``None`` if absent)."""
    return bound.arguments.get(name)


def module_of(bound: inspect.BoundArguments) -> torch.nn.Module:
    """The transformer itself (the bound ``self``)."""
    return bound.arguments["self"]


def as_triple(value) -> tuple[int, int, int]:
    """``patch_size`` configs come as an int or a 3-sequence."""
    if isinstance(value, int):
        return (1, value, value)
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def split_heads(x: torch.Tensor, batch_size: int, heads: int, head_dim: int) -> torch.Tensor:
    """``(B, S, heads*head_dim)`` -> ``(B, heads, S, head_dim)``, the layout of the restated legacy processors."""
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)
