"""``oracle``: the yardstick selector that sees the true attention. Exact attention probabilities are
computed in chunks of query tokens, summed per (query block, key block) into the true block mass,
and each query block keeps the key blocks holding a ``top_p`` share of it.

Slow (it computes the full attention once more), for evaluation only: it tells what any selector at
a given density could achieve. :func:`block_mass` and :func:`mass_coverage` are also the measurement
helpers of the benchmarks (how much of the true attention mass a mask keeps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dit_accel.attention.draft import PlannedMethod, permute_tokens, top_p_keep
from dit_accel.attention.methods import register_method
from dit_accel.attention.sparse_base import BLOCK, SparseConfig, add_call_stats, check_range
from dit_accel.attention.tiling import in_tile_order, raster_order, sequence_order

if TYPE_CHECKING:
    from dit_accel.context import AttentionCall

ORACLE_ORDERS = ("tile", "none")
"""Token orders the oracle can select blocks in."""

CHUNK_ELEMENTS = 1 << 27
"""Largest ``heads x query tokens x keys`` probability matrix built at once."""


def block_mass(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, block: int = BLOCK) -> torch.Tensor:
    """True attention mass per tile: ``(B, H, QB, KB)`` float32, the mean over a query block's rows of the
    attention probability falling in each key block (each row of the result sums to 1)."""
    B, H, S, D = q.shape
    S_k = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qb, kb = -(-S // block), -(-S_k // block)
    # The scores are computed in the inputs' dtype (bf16/fp16 tensor-core GEMM on the GPU; an fp32 GEMM
    # is ~10x slower there), the softmax and the sums in float32: the result only ranks tiles.
    kt = k.transpose(-1, -2)
    pad_k = kb * block - S_k
    out = torch.zeros(B, H, qb, kb, device=q.device)
    rows_per_chunk = max(block, (CHUNK_ELEMENTS // max(1, B * H * S_k)) // block * block)
    for start in range(0, S, rows_per_chunk):
        stop = min(S, start + rows_per_chunk)
        p = torch.softmax((q[:, :, start:stop] * scale) @ kt, dim=-1, dtype=torch.float32)
        if pad_k:
            p = torch.nn.functional.pad(p, (0, pad_k))
        per_key_block = p.view(B, H, stop - start, kb, block).sum(-1)  # (B, H, rows, KB)
        rows = torch.arange(start, stop, device=q.device) // block
        out.index_add_(2, rows, per_key_block)
    counts = torch.full((qb,), float(block), device=q.device)
    counts[-1] = S - (qb - 1) * block
    return out / counts[:, None]


def mass_coverage(mass: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean share of the true attention mass a block selection keeps (``mass`` from :func:`block_mass`,
    ``keep`` a bool mask of the same shape or broadcastable); 1.0 for a dense selection."""
    return (mass * keep).sum(-1).mean()


@dataclass(frozen=True)
class OracleConfig(SparseConfig):
    """Options of ``oracle``."""

    top_p: float | None = None
    """Share of the true attention mass kept per query block, in (0, 1] (``None``: from ``quality``)."""
    min_blocks_fraction: float | None = None
    """Least fraction of key blocks per query block, in [0, 1] (``None``: from ``quality``)."""
    order: str = "tile"
    """Token order the blocks are formed in: ``"tile"`` (3D tiles, as ``permuted``/``combo``) or ``"none"``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("min_blocks_fraction", self.min_blocks_fraction, 0.0, 1.0)
        if self.order not in ORACLE_ORDERS:
            raise ValueError(f"order must be one of {ORACLE_ORDERS}, got {self.order!r}")


@register_method
class OracleMethod(PlannedMethod):
    """Top-p of the exact block mass per query block (evaluation only; see the module docstring)."""

    name = "oracle"
    config_class = OracleConfig

    @property
    def order_name(self) -> str:  # type: ignore[override]
        """Token order recorded in statistics."""
        return self.cfg.order

    @property
    def plans_in_tile_order(self) -> bool:
        """Whether blocks are formed in the 3D-tile order (``order="tile"``): then the forward token order
        saves the per-call permutation (``dit_accel.attention.token_order``)."""
        return self.cfg.order == "tile"

    token_order_tile = None
    """Tile of the order this method plans in (``None``: chosen from the grid)."""

    def order(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> torch.Tensor | None:
        """Tile order; ``order="none"``: the model's row-major order. ``None`` when the sequence already is in
        the wanted order or the grid is unknown (tile order: recorded as ``order_fallback``)."""
        if self.cfg.order == "none":
            return raster_order(ctx.layout, q.shape[-2], q.device)
        perm = sequence_order(ctx.layout, q.shape[-2], q.device)
        if perm is None and not in_tile_order(ctx.layout):
            add_call_stats(ctx, order_fallback=True)
        return perm

    def select(self, q, k, ctx, perm, text_blocks):
        """Top-p of the exact block mass, the diagonal and text rows/columns always kept."""
        cfg = self.cfg
        mass = block_mass(permute_tokens(q, perm), permute_tokens(k, perm))
        nb = mass.shape[-1]
        min_blocks = max(1, math.ceil(cfg.resolved("min_blocks_fraction") * nb))
        keep = top_p_keep(mass, cfg.resolved("top_p"), min_blocks)
        keep |= torch.eye(nb, dtype=torch.bool, device=q.device)
        if text_blocks is not None:
            keep |= text_blocks.view(1, 1, nb, 1) | text_blocks.view(1, 1, 1, nb)
        add_call_stats(ctx, order=self.order_name)
        return keep
