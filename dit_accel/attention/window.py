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

from dit_accel.attention.base import PlannedMethod, PlanStages, SparseConfig, SparsePlan
from dit_accel.attention.blocks import Order
from dit_accel.attention.orders import TileOrder
from dit_accel.attention.tiling import block_boxes, token_coords
from dit_accel.checks import check_choice, check_number
from dit_accel.kernels import block_mask_from_bool

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

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
        check_number("frame_radius", self.frame_radius, 0, 10**6, integer=True)
        check_number("space_radius", self.space_radius, 0, 10**6, integer=True)
        check_choice("decay", self.decay, DECAYS)


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


class WindowSelection:
    """Select stage of ``window``: the window mask of the block boxes (the same for every batch row and head)."""

    def __init__(self, cfg: WindowConfig) -> None:
        self.cfg = cfg

    def mask(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", order: Order | None,
             text_blocks: torch.Tensor | None) -> "BlockMask":
        """The window mask of the blocks formed in ``order``."""
        S = q.shape[-2]
        coords = token_coords(ctx.layout, S, q.device)  # in the sequence's current order
        if order is not None:
            coords = coords.index_select(0, order.perm)
        lo, hi = block_boxes(coords)
        cfg = self.cfg
        keep = window_keep(lo, hi, cfg.frame_radius, cfg.space_radius, cfg.decay)
        return block_mask_from_bool(keep[None, None], S, S)


class WindowMethod(PlannedMethod):
    """Static spatio-temporal window in 3D-tile order (see the module docstring)."""

    name = "window"
    config_class = WindowConfig

    def build_stages(self) -> PlanStages:
        """The tile order chosen from the grid; the window selection."""
        return PlanStages(order=TileOrder(record_fallback=False), select=WindowSelection(self.cfg))

    def _build(self) -> None:
        super()._build()
        self._plans: dict[tuple, "BlockMask | SparsePlan | None"] = {}
        """Plans by (layout, sequence length, device), oldest first."""

    def plan_sparse(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """The window plan of the call's layout (built once per layout); dense without a grid."""
        layout = ctx.layout
        if layout.grid is None:
            ctx.add_stats(sparse_off="no_grid")
            return None
        # Content-independent: one plan per layout, shared by all layers, heads and steps.
        key = (layout, q.shape[-2], str(q.device))
        plan = self._plans.get(key)
        if plan is None:
            plan = super().plan_sparse(q, k, ctx)
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan
