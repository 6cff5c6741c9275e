"""``permuted``: permuted block-sparse attention. Reorder the tokens so that what attends together
lands in the same 128-token blocks, then select blocks with the draft estimate in that order.

Orders:

* ``"tile"``: 3D tile order (:mod:`dit_accel.attention.tiling`): one fixed permutation per grid,
  the same for every layer, head and step (cached; costs only the gather).
* ``"kmeans"``: content-adaptive. Per (batch row, head), k-means on the visual keys; tokens are sorted
  by cluster, and inside a cluster by tile order. Centroids are kept per (transformer, layer, branch)
  in the context's state store and warm-started from the previous step (``kmeans_init_iters``
  iterations on the first sparse step of a generation, then ``kmeans_iters``). The initial centroids
  are evenly spaced keys in tile order, so the result is deterministic.

Text tokens of joint-attention families stay in place (their rows and columns are always kept).
The route folds the permutation into the kernel's loads and stores (``q_index``/``kv_index``). When the
forward token order (:mod:`dit_accel.attention.token_order`) already holds the sequence in the tile
order, the tile order is the identity: no index at all (k-means orders are then relative to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dit_accel.attention.draft import DraftConfig, PlannedMethod
from dit_accel.attention.methods import register_method
from dit_accel.attention.sparse_base import BLOCK, add_call_stats, branch_rows, check_range
from dit_accel.attention.tiling import in_tile_order, sequence_order, validate_tile, visual_order

if TYPE_CHECKING:
    from dit_accel.context import AttentionCall

ORDERS = ("tile", "kmeans")
"""Token orders of ``permuted``."""

KMEANS_CHUNK_ELEMENTS = 1 << 26
"""Largest token x centroid distance matrix (elements) built at once; heads are processed in chunks."""


@dataclass(frozen=True)
class PermutedConfig(DraftConfig):
    """Options of ``permuted`` (the draft selection options apply in the permuted order)."""

    order: str = "tile"
    """Token order: ``"tile"`` (3D tiles from the grid) or ``"kmeans"`` (clusters of keys per head)."""
    tile: tuple[int, int, int] | None = None
    """Tile extent ``(frames, rows, cols)`` of the tile order, volume 64, 128 or 256 (``None``: chosen from
    the grid, see ``tiling.choose_tile``)."""
    clusters: int | None = None
    """k-means clusters per head (``None``: one per kernel block of visual tokens)."""
    kmeans_init_iters: int = 8
    """k-means iterations on the first sparse step of a generation (cold start)."""
    kmeans_iters: int = 2
    """k-means iterations on later steps (warm start from the previous step's centroids)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.tile is not None:
            object.__setattr__(self, "tile", validate_tile(tuple(self.tile) if isinstance(self.tile, list) else self.tile))
        check_range("clusters", self.clusters, 1, 1 << 20, integer=True)
        check_range("kmeans_init_iters", self.kmeans_init_iters, 1, 1000, allow_none=False, integer=True)
        check_range("kmeans_iters", self.kmeans_iters, 0, 1000, allow_none=False, integer=True)


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (L2) of every token: ``x`` ``(R, H, N, D)``, ``centroids`` ``(R, H, C, D)`` -> ``(R, H, N)``."""
    R, H, N, _ = x.shape
    C = centroids.shape[2]
    step = max(1, KMEANS_CHUNK_ELEMENTS // max(1, R * N * C))
    labels = []
    for h in range(0, H, step):
        c = centroids[:, h : h + step]
        # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
        score = x[:, h : h + step] @ c.transpose(-1, -2) - 0.5 * (c * c).sum(-1).unsqueeze(-2)
        labels.append(score.argmax(-1))
    return torch.cat(labels, dim=1)


def kmeans(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations on ``x`` ``(R, H, N, D)`` from ``centroids`` ``(R, H, C, D)``; empty clusters keep
    their centroid. Returns ``(labels (R, H, N), centroids)`` (labels of the final centroids)."""
    x = x.float()
    centroids = centroids.float()
    R, H, N, D = x.shape
    C = centroids.shape[2]
    for _ in range(iters):
        labels = _assign(x, centroids)
        sums = torch.zeros(R, H, C, D, device=x.device).scatter_add_(2, labels[..., None].expand(-1, -1, -1, D), x)
        counts = torch.zeros(R, H, C, device=x.device).scatter_add_(2, labels, torch.ones_like(labels, dtype=x.dtype))
        centroids = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], centroids)
    return _assign(x, centroids), centroids


class PermutedMixin:
    """The ``order`` step of ``permuted`` (shared with ``combo``)."""

    @property
    def order_name(self) -> str:  # type: ignore[override]
        """Token order recorded in statistics: the configured ``order``."""
        return self.cfg.order

    plans_in_tile_order = True
    """Plans in the 3D-tile order (k-means: relative to it), so the forward token order saves the per-call
    permutation (``dit_accel.attention.token_order``)."""

    @property
    def token_order_tile(self) -> tuple[int, int, int] | None:
        """Tile of the order this method plans in (``None``: chosen from the grid)."""
        return self.cfg.tile

    def order(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> torch.Tensor | None:
        """Tile-order permutation ``(S,)``, or the k-means permutation ``(B, H, S)``; ``None`` when the sequence
        already is in the tile order (forward token order), or when the grid is unknown or too small for a tile
        (identity order; recorded as ``order_fallback`` in statistics)."""
        cfg = self.cfg
        S = q.shape[-2]
        tile_perm = sequence_order(ctx.layout, S, q.device, cfg.tile)
        if tile_perm is None and not in_tile_order(ctx.layout, cfg.tile):
            add_call_stats(ctx, order_fallback=True)
            return None
        if cfg.order == "tile":
            return tile_perm
        return self._kmeans_order(k, ctx, tile_perm)

    def _kmeans_order(self, k: torch.Tensor, ctx: "AttentionCall", tile_perm: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        B, H, S, D = k.shape
        vis = ctx.layout.visual_slice(S)
        if tile_perm is None:  # already in tile order
            tile_vis = torch.arange(vis.stop - vis.start, device=k.device)
            k_tile = k[:, :, vis]
        else:
            tile_vis = tile_perm[vis] - vis.start  # visual tokens in tile order, as visual indices
            k_tile = k[:, :, vis].index_select(2, tile_vis)
        n_vis = tile_vis.numel()
        clusters = cfg.clusters if cfg.clusters is not None else max(1, -(-n_vis // BLOCK))
        clusters = min(clusters, n_vis)
        perm = torch.arange(S, device=k.device).repeat(B, H, 1)
        for branch, rows in branch_rows(ctx, B, k.device).items():
            state = ctx.state(branch)
            x = k_tile.index_select(0, rows)
            cents = state.get("kmeans_centroids")
            if cents is None or cents.shape != (x.shape[0], H, clusters, D):
                init = torch.linspace(0, n_vis - 1, clusters, device=k.device).round().long()
                cents, iters = x[:, :, init].float(), cfg.kmeans_init_iters
            else:
                iters = cfg.kmeans_iters
            labels, cents = kmeans(x, cents, iters)
            state["kmeans_centroids"] = cents
            within = torch.argsort(labels * n_vis + torch.arange(n_vis, device=k.device), dim=-1)
            perm[rows, :, vis] = tile_vis[within] + vis.start
        return perm


@register_method
class PermutedMethod(PermutedMixin, PlannedMethod):
    """Permuted block-sparse attention: tile or k-means token order + draft selection (module docstring)."""

    name = "permuted"
    config_class = PermutedConfig


__all__ = ["ORDERS", "PermutedConfig", "PermutedMethod", "kmeans", "visual_order"]
