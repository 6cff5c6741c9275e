"""3D tile order: reorder the visual tokens so that each 128-token kernel block is a compact
frames x rows x columns tile of the latent grid.

The visual tokens arrive in row-major ``(f, h, w)`` order, where a 128-token block is a thin strip
of one or two rows. In tile order a block is a ``tf x th x tw`` box, so the keys a query block
needs (its spatio-temporal neighbourhood) sit in few blocks.

Any grid size works. The tile is chosen from the grid (:func:`choose_tile`): its volume is 64, 128
or 256 tokens (so tiles and kernel blocks stay aligned) and the choice maximises the share of tokens
in *full* tiles, then prefers square spatial tiles about two frames deep. Grids that the tile does not divide leave ragged edges: the tokens of full tiles
come first (each block one tile, or half of one, or two neighbouring ones), then the edge remainders,
clipped tiles in raster order (their blocks are less compact but still local). Without a grid (or
when no tile fits, e.g. fewer than 64 visual tokens) the order is the identity: a documented
fallback, never an error.

Text tokens of joint-attention families stay where they are.

Orders are relative to the order the sequence is in: row-major, or already the tile order when the
once-per-forward token order (:mod:`dit_accel.attention.token_order`) permuted the blocks' input
(``TokenLayout.tile_order``). Then :func:`sequence_order` is the identity (``None``) and the kernel
runs without a token index.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from dit_accel.attention.blocks import BLOCK, Order

TILE_VOLUMES = (128, 64, 256)
"""Tile volumes considered, in order of preference at equal coverage (one block per tile first)."""


@dataclass(frozen=True)
class TileChoice:
    """The tile chosen for a grid."""

    tile: tuple[int, int, int]
    """Tile extent ``(tf, th, tw)`` in latent tokens."""
    coverage: float
    """Share of the visual tokens that lie in full tiles (1.0 when the tile divides the grid)."""


def _powers_of_two(limit: int) -> list[int]:
    out, p = [], 1
    while p <= limit:
        out.append(p)
        p *= 2
    return out


@functools.lru_cache(maxsize=256)
def choose_tile(grid: tuple[int, int, int], block: int = BLOCK) -> TileChoice | None:
    """The tile for ``grid`` (see the module docstring), or ``None`` when no tile of volume 64-256 fits."""
    F, H, W = (int(x) for x in grid)
    if min(F, H, W) <= 0:
        raise ValueError(f"grid must have positive extents, got {grid!r}")
    best: tuple | None = None
    choice: TileChoice | None = None
    for vol_rank, volume in enumerate(v * block // 128 for v in TILE_VOLUMES):
        for tf in _powers_of_two(min(F, volume)):
            for th in _powers_of_two(min(H, volume // tf)):
                tw = volume // (tf * th)
                if tw > W or tf * th * tw != volume:
                    continue
                coverage = (F // tf * tf) * (H // th * th) * (W // tw * tw) / (F * H * W)
                # At equal coverage: one block per tile, square in space, about 2 frames deep (as the
                # attention-structure benchmark's default tile, e.g. 2x8x8 on a 16x32x32 grid).
                shape = 2 * abs(math.log(th / tw)) + abs(math.log(tf / 2))
                key = (-round(coverage, 2), vol_rank, shape, tf)
                if best is None or key < best:
                    best, choice = key, TileChoice((tf, th, tw), coverage)
    return choice


def validate_tile(tile: tuple[int, int, int], block: int = BLOCK) -> tuple[int, int, int]:
    """Check a user-given tile: three positive ints whose product is 64, 128 or 256 (block-aligned)."""
    if not (isinstance(tile, (tuple, list)) and len(tile) == 3 and all(isinstance(t, int) and t > 0 for t in tile)):
        raise ValueError(f"tile must be three positive ints (tf, th, tw), got {tile!r}")
    volume = tile[0] * tile[1] * tile[2]
    allowed = tuple(v * block // 128 for v in TILE_VOLUMES)
    if volume not in allowed:
        raise ValueError(f"tile {tuple(tile)} has {volume} tokens; allowed volumes: {sorted(allowed)} (kernel block {block})")
    return tuple(tile)  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _visual_tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    F, H, W = grid
    tf, th, tw = tile
    f = torch.arange(F).view(F, 1, 1).expand(F, H, W).reshape(-1)
    h = torch.arange(H).view(1, H, 1).expand(F, H, W).reshape(-1)
    w = torch.arange(W).view(1, 1, W).expand(F, H, W).reshape(-1)
    full = (f < F // tf * tf) & (h < H // th * th) & (w < W // tw * tw)
    n_th, n_tw = -(-H // th), -(-W // tw)
    tile_idx = ((f // tf) * n_th + h // th) * n_tw + w // tw
    within = ((f % tf) * th + h % th) * tw + w % tw
    volume = tf * th * tw
    n_tiles = -(-F // tf) * n_th * n_tw
    key = (~full).long() * (n_tiles * volume) + tile_idx * volume + within
    return torch.argsort(key)


def visual_order(grid: tuple[int, int, int], tile: tuple[int, int, int] | None = None) -> torch.Tensor | None:
    """Permutation ``(F*H*W,)`` of the visual tokens into tile order (``perm[i]`` = original index of the
    i-th token in tile order), or ``None`` when no tile fits (identity order)."""
    if tile is None:
        choice = choose_tile(tuple(grid))
        if choice is None:
            return None
        tile = choice.tile
    return _visual_tile_order(tuple(int(g) for g in grid), tuple(tile))


@functools.lru_cache(maxsize=64)
def tile_permutation(grid: tuple[int, int, int], tile: tuple[int, int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, inverse)`` of the visual tile order on ``device`` (int64, cached per grid, tile and device):
    ``perm`` as :func:`visual_order`, ``inverse[j]`` = position in tile order of raster token ``j``."""
    perm = _visual_tile_order(tuple(int(g) for g in grid), tuple(tile))
    return perm.to(device), torch.argsort(perm).to(device)


@functools.lru_cache(maxsize=64)
def _sequence_order_cached(grid: tuple[int, int, int], tile: tuple[int, int, int] | None,
                           current: tuple[int, int, int] | None, seq_len: int, start: int,
                           device: str) -> Order | None:
    if current is not None:
        # raster -> target order, then raster index -> position in the current (tile) order
        vis = tile_permutation(grid, current, "cpu")[1][visual_order(grid, tile)]
    else:
        vis = visual_order(grid, tile)
    if vis is None:
        return None
    perm = torch.arange(seq_len)
    perm[start : start + vis.numel()] = vis + start
    return Order(perm.to(device))


def _target_tile(layout, tile: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
    if tile is not None:
        return tuple(tile)
    choice = choose_tile(tuple(layout.grid))
    return None if choice is None else choice.tile


def in_tile_order(layout, tile: tuple[int, int, int] | None = None) -> bool:
    """Whether the sequence already is in the tile order of ``tile`` (``None``: the tile chosen from the grid),
    i.e. the forward token order put it there (``layout.tile_order``)."""
    current = getattr(layout, "tile_order", None)
    return layout.grid is not None and current is not None and current == _target_tile(layout, tile)


def tile_order(layout, seq_len: int, device: torch.device, tile: tuple[int, int, int] | None = None
               ) -> Order | None:
    """The :class:`~dit_accel.attention.blocks.Order` from the sequence's current order into the 3D-tile order
    of ``tile`` (``None``: chosen from the grid), text tokens in place: ``perm[i]`` = current position of the
    i-th token in tile order. The current order is row-major, or a tile order when ``layout.tile_order`` is set
    (the forward token order, :mod:`dit_accel.attention.token_order`).

    ``None`` (identity) when the grid is unknown, no tile fits, or the sequence already is in that tile order
    (:func:`in_tile_order` tells the last case apart). Cached per (grid, tile, current order, layout, device),
    so the same object (and the tensors derived from it) comes back for every call of a grid.
    """
    if layout.grid is None:
        return None
    target = _target_tile(layout, tile)
    if target is None:
        return None
    current = getattr(layout, "tile_order", None)
    if current == target:
        return None
    vis = layout.visual_slice(seq_len)
    return _sequence_order_cached(tuple(layout.grid), target, current, seq_len, vis.start, str(device))


def sequence_order(layout, seq_len: int, device: torch.device, tile: tuple[int, int, int] | None = None
                   ) -> torch.Tensor | None:
    """The permutation ``(seq_len,)`` of :func:`tile_order` (``None``: identity); the same tensor object for
    every call of a grid."""
    order = tile_order(layout, seq_len, device, tile)
    return None if order is None else order.perm


@functools.lru_cache(maxsize=64)
def _raster_order_cached(grid: tuple[int, int, int], current: tuple[int, int, int], seq_len: int, start: int,
                         device: str) -> Order:
    inverse = tile_permutation(grid, current, "cpu")[1]
    perm = torch.arange(seq_len)
    perm[start : start + inverse.numel()] = inverse + start
    return Order(perm.to(device))


def row_major_order(layout, seq_len: int, device: torch.device) -> Order | None:
    """The :class:`~dit_accel.attention.blocks.Order` from the sequence's current order back into row-major
    order (``perm[i]`` = current position of the i-th token in raster order), or ``None`` when it already is
    row-major (always, unless the forward token order holds it in tile order). Cached like :func:`tile_order`."""
    current = getattr(layout, "tile_order", None)
    if layout.grid is None or current is None:
        return None
    vis = layout.visual_slice(seq_len)
    return _raster_order_cached(tuple(layout.grid), tuple(current), seq_len, vis.start, str(device))


def raster_order(layout, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """The permutation ``(seq_len,)`` of :func:`row_major_order` (``None``: already row-major)."""
    order = row_major_order(layout, seq_len, device)
    return None if order is None else order.perm


def token_coords(layout, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """Float ``(seq_len, 3)`` latent ``(f, h, w)`` of every token in the sequence's current order (row-major,
    or the tile order ``layout.tile_order``); text tokens NaN. ``None`` when the grid is unknown."""
    if layout.grid is None:
        return None
    F, H, W = layout.grid
    coords = torch.full((seq_len, 3), float("nan"), device=device)
    idx = torch.arange(F * H * W, device=device)
    current = getattr(layout, "tile_order", None)
    if current is not None:
        idx = tile_permutation(tuple(layout.grid), tuple(current), str(torch.device(device)))[0]
    vis = layout.visual_slice(seq_len)
    coords[vis, 0] = (idx // (H * W)).float()
    coords[vis, 1] = (idx // W % H).float()
    coords[vis, 2] = (idx % W).float()
    return coords


def block_boxes(coords: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding boxes of each block's visual tokens: ``(lo, hi)``, each ``(..., num_blocks, 3)``.

    ``coords`` is ``(..., S, 3)`` in the planned (possibly permuted) order with NaN for text tokens; a
    block without visual tokens gets ``lo = +inf`` and ``hi = -inf``.
    """
    S = coords.shape[-2]
    nb = -(-S // block)
    pad = nb * block - S
    if pad:
        coords = torch.nn.functional.pad(coords, (0, 0, 0, pad), value=float("nan"))
    c = coords.reshape(*coords.shape[:-2], nb, block, 3)
    nan = torch.isnan(c)
    lo = torch.where(nan, torch.full_like(c, float("inf")), c).amin(-2)
    hi = torch.where(nan, torch.full_like(c, float("-inf")), c).amax(-2)
    return lo, hi
