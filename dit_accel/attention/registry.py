"""The attention methods by name: the registry, filled from an explicit list, and ``get_method``."""

from __future__ import annotations

import inspect
from typing import Any

from dit_accel.attention.base import AttentionMethod
from dit_accel.attention.combo import ComboMethod
from dit_accel.attention.draft import DraftMethod
from dit_accel.attention.exact import DenseMethod, FullMethod
from dit_accel.attention.oracle import OracleMethod
from dit_accel.attention.permuted import PermutedMethod
from dit_accel.attention.temporal_skip import TemporalSkipMethod
from dit_accel.attention.window import WindowMethod
from dit_accel.checks import check_options
from dit_accel.registry import Registry

METHODS: Registry[AttentionMethod] = Registry("attention method", AttentionMethod, "registered methods")
"""The attention methods ``get_method`` builds, by name."""

for _cls in (DenseMethod, FullMethod, DraftMethod, PermutedMethod, TemporalSkipMethod, ComboMethod, OracleMethod,
             WindowMethod):
    METHODS.register(_cls)


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    """Class decorator: register an :class:`AttentionMethod` subclass under ``cls.name``."""
    return METHODS.register(cls)


def available_methods() -> list[str]:
    """Names of the registered attention methods."""
    return METHODS.names()


def _allowed_options(cls: type[AttentionMethod]) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    return sorted(names)


def get_method(name: str | AttentionMethod, **config: Any) -> AttentionMethod:
    """Build the method registered as ``name`` with keyword options ``config``.

    An :class:`AttentionMethod` instance is returned unchanged (then ``config`` must be empty).
    Raises ``ValueError`` naming the bad value and the allowed ones.
    """
    if isinstance(name, AttentionMethod):
        if config:
            raise ValueError(f"options {sorted(config)} given together with a method instance {name!r}")
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"attention method must be a str or AttentionMethod, got {type(name).__name__}: {name!r}; "
            f"registered methods: {available_methods()}"
        )
    cls = METHODS.get(name)
    check_options(f"attention method {name!r}", config, _allowed_options(cls))
    return cls(**config)
