"""Attention methods: how each self-attention call chooses the key blocks every query block sees.

A method implements ``plan(q, k, ctx) -> BlockMask | SparsePlan | None``: ``q`` and ``k`` are
``(B, H, S, D)``, ``ctx`` is the call's :class:`dit_accel.context.AttentionCall` (layout, step,
branch per batch row, and ``ctx.state(branch)`` for state that must survive between steps).
``None`` means "run dense". A :class:`SparsePlan` adds a token permutation (the kernel then runs on
the permuted tokens and the output is permuted back). A method that sets ``needs_tile_stats`` gets
the kernel's per-tile statistics back through ``observe(ctx, tile_stats)`` after the call.
Methods are configuration only: one instance is shared by every layer, so any per-layer or
per-branch state goes through ``ctx.state(...)``, never onto ``self``.

Methods are registered by name with :func:`register_method`; :func:`get_method` builds one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dit_accel.context import AttentionCall

DEFAULT_MIN_SEQ_LEN = 1024
"""Below this many tokens a self-attention call runs dense: block sparsity cannot pay off."""


@dataclass(frozen=True)
class SparsePlan:
    """A block mask over a permuted token order.

    ``perm`` maps permuted positions to original ones: token ``i`` of the permuted sequence is token
    ``perm[i]`` of the original. Shape ``(S,)`` (same order for every batch row and head) or
    ``(B, H, S)``; ``None`` means no permutation. ``mask`` is expressed in the permuted order.
    """

    mask: "BlockMask"
    """Block mask over the (permuted) sequence."""
    perm: torch.Tensor | None = None
    """int64 permutation of the sequence positions, or ``None``."""


class AttentionMethod:
    """Base class of attention methods (configuration plus a ``plan`` function)."""

    name: ClassVar[str] = ""
    """Registry name, e.g. ``"full"``."""
    needs_tile_stats: ClassVar[bool] = False
    """When True the kernel also returns per-tile statistics, passed to :meth:`observe`."""

    def __init__(self, *, min_seq_len: int = DEFAULT_MIN_SEQ_LEN) -> None:
        """``min_seq_len``: self-attention calls shorter than this run dense without planning."""
        if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int) or min_seq_len < 0:
            raise ValueError(f"min_seq_len must be an int >= 0, got {min_seq_len!r}")
        self.min_seq_len = min_seq_len

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """Return the block mask (or a permuted :class:`SparsePlan`) for this call, or ``None`` to run dense."""
        raise NotImplementedError

    def observe(self, ctx: "AttentionCall", tile_stats: torch.Tensor) -> None:
        """Receive the kernel's ``(B, H, Q_BLOCKS, KV_BLOCKS)`` tile statistics of the call just run
        (in the planned, possibly permuted, order); only called when ``needs_tile_stats`` is True."""

    def config(self) -> dict[str, Any]:
        """The method's options as a plain dict (recorded in run logs)."""
        return {"min_seq_len": self.min_seq_len}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({opts})"


_METHODS: dict[str, type[AttentionMethod]] = {}


def register_method(cls: type[AttentionMethod]) -> type[AttentionMethod]:
    """Class decorator: register an :class:`AttentionMethod` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionMethod)):
        raise TypeError(f"register_method expects an AttentionMethod subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"attention method {cls.name!r} is already registered by {_METHODS[cls.name].__name__}")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered attention methods."""
    return sorted(_METHODS)


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
    if name not in _METHODS:
        raise ValueError(f"unknown attention method {name!r}; registered methods: {available_methods()}")
    cls = _METHODS[name]
    allowed = _allowed_options(cls)
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attention method {name!r}; allowed options: {allowed}")
    return cls(**config)


@register_method
class DenseMethod(AttentionMethod):
    """Exact dense attention for every call (the baseline; runs on the fastest dense backend)."""

    name = "dense"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | None":
        """Always ``None``: run dense."""
        return None


@register_method
class FullMethod(AttentionMethod):
    """Every query block attends to every key block through the block-sparse kernel.

    Numerically equal to dense attention; it exists to exercise the sparse execution path
    (planning, mask, kernel, statistics) end to end.
    """

    name = "full"

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask":
        """A full-density block mask for ``q``'s and ``k``'s shapes."""
        from dit_accel.kernels import dense_block_mask

        # B = H = 1 broadcasts over the batch and the heads.
        return dense_block_mask(1, 1, q.shape[-2], k.shape[-2], device=q.device)


# The sparse methods register themselves on import; imported last because they import this module.
from dit_accel.attention import combo, draft, oracle, permuted, temporal_skip, window  # noqa: E402,F401
