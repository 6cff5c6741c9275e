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

from dit_accel.attention.base import PlannedMethod, PlanStages, SparseConfig
from dit_accel.attention.blocks import BLOCK, Order, permute_tokens
from dit_accel.attention.draft_estimate import top_p_keep
from dit_accel.attention.orders import RowMajorOrder, TileOrder
from dit_accel.checks import check_choice, check_number
from dit_accel.kernels import block_mask_from_bool

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

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
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True, allow_none=True)
        check_number("min_blocks_fraction", self.min_blocks_fraction, 0.0, 1.0, allow_none=True)
        check_choice("order", self.order, ORACLE_ORDERS)


class OracleSelection:
    """Select stage of ``oracle``: top-p of the exact block mass, the diagonal and text rows/columns always kept."""

    def __init__(self, cfg: OracleConfig) -> None:
        self.cfg = cfg

    def mask(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", order: Order | None,
             text_blocks: torch.Tensor | None) -> "BlockMask":
        """The BlockMask of the exact selection in ``order``."""
        cfg = self.cfg
        perm = None if order is None else order.perm
        mass = block_mass(permute_tokens(q, perm), permute_tokens(k, perm))
        nb = mass.shape[-1]
        min_blocks = max(1, math.ceil(cfg.resolved("min_blocks_fraction") * nb))
        keep = top_p_keep(mass, cfg.top_p_of(ctx.layer), min_blocks)
        keep |= torch.eye(nb, dtype=torch.bool, device=q.device)
        if text_blocks is not None:
            keep |= text_blocks.view(1, 1, nb, 1) | text_blocks.view(1, 1, 1, nb)
        S = q.shape[-2]
        return block_mask_from_bool(keep, S, S)


class OracleMethod(PlannedMethod):
    """Top-p of the exact block mass per query block (evaluation only; see the module docstring)."""

    name = "oracle"
    config_class = OracleConfig

    def build_stages(self) -> PlanStages:
        """The tile order (``order="tile"``) or the model's row-major order; the exact selection."""
        order = TileOrder() if self.cfg.order == "tile" else RowMajorOrder()
        return PlanStages(order=order, select=OracleSelection(self.cfg))
