"""``permuted``: permuted block-sparse attention. Reorder the tokens so that what attends together
lands in the same 128-token blocks, then select blocks with the draft estimate in that order.

Orders:

* ``"tile"``: 3D tile order (:mod:`dit_accel.attention.tiling`): one fixed permutation per grid,
  the same for every layer, head and step (cached; costs only the gather).
* ``"kmeans"``: content-adaptive. Per (batch row, head), k-means on the visual keys; tokens are sorted
  by cluster, and inside a cluster by tile order. Centroids are kept per (transformer, layer, branch)
  (:class:`KMeansState`) and warm-started from the previous step (``kmeans_init_iters`` iterations on the
  first sparse step of a generation, then ``kmeans_iters``). The initial centroids are evenly spaced keys in
  tile order, so the result is deterministic.

Text tokens of joint-attention families stay in place (their rows and columns are always kept).
The route folds the permutation into the kernel's loads and stores (``q_index``/``kv_index``). When the
forward token order (:mod:`dit_accel.attention.token_order`) already holds the sequence in the tile
order, the tile order is the identity: no index at all (k-means orders are then relative to it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dit_accel.attention.base import PlannedMethod, PlanStages
from dit_accel.attention.blocks import BLOCK, Order, branch_rows
from dit_accel.attention.draft import DraftConfig, DraftSelection
from dit_accel.attention.orders import TileOrder
from dit_accel.attention.tiling import tile_order, validate_tile
from dit_accel.checks import check_choice, check_number
from dit_accel.context import State

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
        check_choice("order", self.order, ORDERS)
        if self.tile is not None:
            object.__setattr__(self, "tile", validate_tile(tuple(self.tile) if isinstance(self.tile, list) else self.tile))
        check_number("clusters", self.clusters, 1, 1 << 20, integer=True, allow_none=True)
        check_number("kmeans_init_iters", self.kmeans_init_iters, 1, 1000, integer=True)
        check_number("kmeans_iters", self.kmeans_iters, 0, 1000, integer=True)


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


@dataclass
class KMeansState(State):
    """The k-means centroids of one (transformer, layer, branch), warm start of the next step's clustering."""

    centroids: torch.Tensor | None = None
    """``(rows, H, clusters, D)`` float32 centroids of the last clustering."""


class KMeansOrder(TileOrder):
    """Order stage of ``permuted``/``combo`` with ``order="kmeans"``: per (batch row, head), the visual tokens
    sorted by the k-means cluster of their key, and inside a cluster by tile order."""

    name = "kmeans"

    def __init__(self, cfg: PermutedConfig) -> None:
        super().__init__(cfg.tile)
        self.cfg = cfg

    def __call__(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> Order | None:
        """The k-means order ``(B, H, S)``; ``None`` when the grid gives no tile order (``order_fallback``)."""
        tile = tile_order(ctx.layout, q.shape[-2], q.device, self.tile)
        if tile is None and not self.in_order(ctx):
            ctx.add_stats(order_fallback=True)
            return None
        return Order(self._kmeans_perm(k, ctx, None if tile is None else tile.perm))

    def _kmeans_perm(self, k: torch.Tensor, ctx: "AttentionCall", tile_perm: torch.Tensor | None) -> torch.Tensor:
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
            state = ctx.state(branch, KMeansState)
            x = k_tile.index_select(0, rows)
            cents = state.centroids
            if cents is None or cents.shape != (x.shape[0], H, clusters, D):
                init = torch.linspace(0, n_vis - 1, clusters, device=k.device).round().long()
                cents, iters = x[:, :, init].float(), cfg.kmeans_init_iters
            else:
                iters = cfg.kmeans_iters
            labels, state.centroids = kmeans(x, cents, iters)
            within = torch.argsort(labels * n_vis + torch.arange(n_vis, device=k.device), dim=-1)
            perm[rows, :, vis] = tile_vis[within] + vis.start
        return perm


def permuted_order(cfg: PermutedConfig) -> TileOrder:
    """The order stage of ``cfg.order``: the tile order, or k-means clusters relative to it."""
    return KMeansOrder(cfg) if cfg.order == "kmeans" else TileOrder(cfg.tile)


class PermutedMethod(PlannedMethod):
    """Permuted block-sparse attention: tile or k-means token order + draft selection (module docstring)."""

    name = "permuted"
    config_class = PermutedConfig

    def build_stages(self) -> PlanStages:
        """The configured order; the draft selection in it."""
        return PlanStages(order=permuted_order(self.cfg), select=DraftSelection(self.cfg))
