"""Registry of supported model families, detected from the transformer's class."""

from __future__ import annotations

import torch

from dit_accel.pipelines import cogvideox, flux, hunyuan_video, ltx_video, pixart, sd3, wan
from dit_accel.pipelines.base import Family

FAMILIES: dict[str, Family] = {
    m.FAMILY.name: m.FAMILY for m in (wan, hunyuan_video, cogvideox, ltx_video, flux, pixart, sd3)
}
"""Family name -> adapter."""

_BY_CLASS: dict[str, Family] = {f.transformer_class: f for f in FAMILIES.values()}


def supported_transformer_classes() -> list[str]:
    """diffusers transformer class names dit-accel supports."""
    return sorted(_BY_CLASS)


def family_names() -> list[str]:
    """Names of the supported families."""
    return list(FAMILIES)


def get_family(name: str) -> Family:
    """The family adapter called ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; supported families: {family_names()}")
    return FAMILIES[name]


def detect_family(transformer: object) -> Family:
    """The family of a diffusers transformer instance (matched on its class or a base class).

    Raises ``TypeError`` for a non-module and ``ValueError`` for an unsupported transformer class.
    """
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            f"expected a diffusers transformer (torch.nn.Module), got {type(transformer).__name__}; "
            f"supported classes: {supported_transformer_classes()}"
        )
    if hasattr(transformer, "_orig_mod"):  # torch.compile wrapper: hooks and processors must go on the model
        raise ValueError(
            f"got a torch.compile-wrapped {type(transformer._orig_mod).__name__}; apply dit_accel before "
            "torch.compile(...) (or pass the uncompiled module)"
        )
    for klass in type(transformer).__mro__:
        if klass.__name__ in _BY_CLASS and klass.__module__.startswith("diffusers."):
            return _BY_CLASS[klass.__name__]
    raise ValueError(
        f"unsupported transformer class {type(transformer).__name__!r}; "
        f"supported classes: {supported_transformer_classes()}"
    )
