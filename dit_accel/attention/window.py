"""``window``: a static spatio-temporal window (the Radial / STA family), the second yardstick.

In 3D-tile order every kernel block is a compact box of latent tokens. A query block keeps the key
blocks whose box lies within ``frame_radius`` latent frames and ``space_radius`` latent tokens (rows
and columns, Chebyshev) of its own box (gap between the boxes, 0 when they overlap). With
``decay="radial"`` the spatial radius halves each time the frame distance doubles (Radial
Attention's energy decay). The mask depends only on the grid, never on the content. Text rows and
columns and the diagonal are always kept. Without a grid the call runs dense (documented fallback,
recorded as ``sparse_off="no_grid"``). Under the forward token order (the sequence already in tile
order) the order is the identity and the boxes come from the tokens' coordinates in that order, so the
mask is the same.

Because the mask depends only on the layout, the plan (BlockMask and order) is built once per layout
and device and reused by every layer and step (:data:`PLAN_CACHE_SIZE` layouts kept per method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dit_accel.attention.draft import PlannedMethod
from dit_accel.attention.methods import register_method
from dit_accel.attention.sparse_base import SparseConfig, add_call_stats, check_range
from dit_accel.attention.tiling import block_boxes, sequence_order, token_coords

if TYPE_CHECKING:
    from dit_accel.context import AttentionCall

PLAN_CACHE_SIZE = 8
"""Layouts (grid, token order, text layout, length, device) whose window plan a method keeps."""

DECAYS = ("none", "radial")
"""Window shapes: a box (STA) or a box whose spatial radius shrinks with frame distance (Radial)."""


@dataclass(frozen=True)
class WindowConfig(SparseConfig):
    """Options of ``window`` (its knob is the radius; ``quality`` only sets the dense warm-up)."""

    frame_radius: int = 2
    """Largest gap, in latent frames, between a query block's box and a kept key block's box (>= 0)."""
    space_radius: int = 8
    """Largest gap, in latent tokens along rows and columns, between the boxes (>= 0)."""
    decay: str = "none"
    """``"none"`` (box window) or ``"radial"`` (spatial radius halves as the frame gap doubles)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("frame_radius", self.frame_radius, 0, 10**6, allow_none=False, integer=True)
        check_range("space_radius", self.space_radius, 0, 10**6, allow_none=False, integer=True)
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")


def window_keep(lo: torch.Tensor, hi: torch.Tensor, frame_radius: int, space_radius: int, decay: str) -> torch.Tensor:
    """Bool ``(NB, NB)`` window mask from block boxes ``lo``/``hi`` ``(NB, 3)`` (text-only blocks: kept)."""
    gap = (lo.unsqueeze(0) - hi.unsqueeze(1)).clamp_min(0) + (lo.unsqueeze(1) - hi.unsqueeze(0)).clamp_min(0)
    gap_f = gap[..., 0]
    gap_s = torch.maximum(gap[..., 1], gap[..., 2])
    radius = torch.full_like(gap_f, float(space_radius))
    if decay == "radial":
        radius = radius / torch.exp2(torch.floor(torch.log2(gap_f.clamp_min(0) + 1)))
    keep = (gap_f <= frame_radius) & (gap_s <= radius)
    text = torch.isinf(lo[:, 0])
    keep |= text.unsqueeze(0) | text.unsqueeze(1)
    keep |= torch.eye(lo.shape[0], dtype=torch.bool, device=lo.device)
    return keep


@register_method
class WindowMethod(PlannedMethod):
    """Static spatio-temporal window in 3D-tile order (see the module docstring)."""

    name = "window"
    config_class = WindowConfig
    order_name = "tile"
    plans_in_tile_order = True
    """Plans in the 3D-tile order (chosen from the grid), so the forward token order saves the permutation."""
    token_order_tile = None
    """Tile of the order this method plans in (``None``: chosen from the grid)."""

    def _plan(self, q, k, ctx: "AttentionCall"):
        layout = ctx.layout
        if layout.grid is None:
            add_call_stats(ctx, sparse_off="no_grid")
            return None
        # Content-independent: one plan per layout, shared by all layers, heads and steps.
        key = (layout, q.shape[-2], str(q.device))
        cache = self.__dict__.setdefault("_plans", {})
        plan = cache.get(key)
        if plan is None:
            plan = super()._plan(q, k, ctx)
            if len(cache) >= PLAN_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = plan
        else:
            add_call_stats(ctx, order=self.order_name)
        return plan

    def order(self, q, k, ctx):
        """Tile order of the sequence (identity when no tile fits or the sequence already is in it)."""
        return sequence_order(ctx.layout, q.shape[-2], q.device)

    def select(self, q, k, ctx, perm, text_blocks):
        """The window mask (the same for every batch row and head)."""
        S = q.shape[-2]
        coords = token_coords(ctx.layout, S, q.device)  # in the sequence's current order
        if perm is not None:
            coords = coords.index_select(0, perm)
        lo, hi = block_boxes(coords)
        cfg = self.cfg
        keep = window_keep(lo, hi, cfg.frame_radius, cfg.space_radius, cfg.decay)
        add_call_stats(ctx, order=self.order_name)
        return keep[None, None]
