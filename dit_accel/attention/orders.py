"""Order stages: the token order a planned method forms its 128-token blocks in.

* :class:`TileOrder`: the 3D-tile order of the grid (:mod:`dit_accel.attention.tiling`), one cached
  permutation per grid, the same for every layer, head and step;
* :class:`RowMajorOrder`: the model's row-major order (the identity unless the forward token order holds the
  sequence in tile order);
* ``permuted.KMeansOrder``: clusters of keys per head, relative to the tile order.

Without a grid, or when no tile fits, the tile order is the identity (``None``), recorded as
``order_fallback`` in the call's statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dit_accel.attention.blocks import Order
from dit_accel.attention.tiling import in_tile_order, row_major_order, tile_order

if TYPE_CHECKING:
    from dit_accel.context import AttentionCall


class TileOrder:
    """The 3D-tile order of ``tile`` (``None``: chosen from the grid)."""

    name = "tile"
    plans_in_tile_order = True

    def __init__(self, tile: tuple[int, int, int] | None = None, *, record_fallback: bool = True) -> None:
        self.tile = tile
        """Tile of the order (``None``: chosen from the grid)."""
        self.record_fallback = record_fallback
        """Record ``order_fallback`` when the grid gives no tile order."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> Order | None:
        """The tile order of the call; ``None`` when the sequence already is in it (forward token order), or
        when the grid is unknown or too small for a tile (identity; ``order_fallback`` in statistics)."""
        order = tile_order(ctx.layout, q.shape[-2], q.device, self.tile)
        if order is None and self.record_fallback and not self.in_order(ctx):
            ctx.add_stats(order_fallback=True)
        return order

    def in_order(self, ctx: "AttentionCall") -> bool:
        """Whether the call's sequence already is in this tile order."""
        return in_tile_order(ctx.layout, self.tile)


class RowMajorOrder:
    """The model's row-major order (from the tile order when the forward token order holds the sequence in it)."""

    name = "none"
    plans_in_tile_order = False
    tile = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> Order | None:
        """``None`` when the sequence already is row-major, else the order back to it."""
        return row_major_order(ctx.layout, q.shape[-2], q.device)
