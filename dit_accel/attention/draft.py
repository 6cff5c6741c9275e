"""``draft``: draft low-resolution guidance. Pool Q and K per 128-token block, compute the low-resolution
attention map, keep per query block the key blocks that hold a top-p share of its mass
(:mod:`dit_accel.attention.draft_estimate`).

:class:`DraftSelection` is the select stage shared by every draft-based method (``draft``, ``permuted``,
``temporal_skip``, ``combo``): the estimate with the configured thresholds, its BlockMask, and its fallback
counts in the call's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dit_accel.attention.base import PlannedMethod, PlanStages, SparseConfig
from dit_accel.attention.blocks import BLOCK, Order
from dit_accel.attention.draft_estimate import DRAFT_MAP_BACKENDS, DraftEstimate, MapBackend, draft_estimate
from dit_accel.checks import check_bool, check_choice, check_number

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dit_accel.context import AttentionCall


@dataclass(frozen=True)
class DraftConfig(SparseConfig):
    """Options of ``draft`` (and of the methods built on its selection)."""

    top_p: float | None = None
    """Share of the estimated attention mass kept per query block, in (0, 1]; 1 keeps every block
    (``None``: from ``quality``)."""
    min_blocks_fraction: float | None = None
    """Least fraction of the key blocks kept per query block, in [0, 1] (at least one block besides the
    diagonal rule; ``None``: from ``quality``)."""
    similarity_threshold: float | None = None
    """Blocks whose tokens have a mean cosine similarity to their mean below this, in [-1, 1], are
    computed densely (whole row for query blocks, whole column for key blocks; ``None``: from
    ``quality``; -1 turns the check off)."""
    log_block_size: bool = True
    """Add ``log(tokens in the key block)`` to the pooled logits (matters for the ragged last block)."""
    scale: float | None = None
    """Softmax scale of the draft logits (``None``: ``1/sqrt(head_dim)``, the attention default)."""
    query_pool: int = 4
    """Query tokens per pooled query (a divisor of the 128-token block; 128 = one pooled query per block,
    the classic draft). Smaller sees more of a block's rows (4 vs 128: about 2-3 dB lower attention-output
    error at equal density on the testbed) and costs a ``(S / query_pool) x blocks`` map."""
    temperature: float = 1.6
    """Divides the draft logits, > 0 (1 = the attention's own scale). Pooled keys hide the spread of their
    tokens' logits, so the raw map underrates wide blocks; 1.4-2 was best on the testbed's captured q/k."""
    map_backend: MapBackend = "auto"
    """Where the draft map and the selection run: ``"auto"`` (the Triton kernels where they apply, else torch),
    ``"triton"`` or ``"torch"`` (the reference; benchmarks time it with this)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (isinstance(self.query_pool, bool) or not isinstance(self.query_pool, int) or self.query_pool < 1
                or BLOCK % self.query_pool):
            raise ValueError(f"query_pool must be a divisor of {BLOCK} (1, 2, 4, ..., {BLOCK}), got {self.query_pool!r}")
        check_number("temperature", self.temperature, 0.0, math.inf, lo_open=True)
        check_number("top_p", self.top_p, 0.0, 1.0, lo_open=True, allow_none=True)
        check_number("min_blocks_fraction", self.min_blocks_fraction, 0.0, 1.0, allow_none=True)
        check_number("similarity_threshold", self.similarity_threshold, -1.0, 1.0, allow_none=True)
        check_bool("log_block_size", self.log_block_size)
        check_number("scale", self.scale, 0.0, math.inf, lo_open=True, allow_none=True)
        check_choice("map_backend", self.map_backend, DRAFT_MAP_BACKENDS)


class DraftSelection:
    """Select stage of the draft-based methods: the draft estimate in the planned order and its BlockMask."""

    def __init__(self, cfg: DraftConfig) -> None:
        self.cfg = cfg

    def estimate(self, q: torch.Tensor, k: torch.Tensor, order: Order | None, text_blocks: torch.Tensor | None,
                 block_indices: bool = False, layer: int = -1) -> DraftEstimate:
        """The draft estimate of this call in ``order``, with the configured thresholds (``layer``: the call's
        self-attention layer, for a per-layer ``top_p``; ``block_indices``: see
        :func:`~dit_accel.attention.draft_estimate.draft_estimate`)."""
        cfg = self.cfg
        return draft_estimate(
            q,
            k,
            perm=order,
            top_p=cfg.top_p_of(layer),
            min_blocks_fraction=cfg.resolved("min_blocks_fraction"),
            similarity_threshold=cfg.resolved("similarity_threshold"),
            log_block_size=cfg.log_block_size,
            scale=cfg.scale,
            query_pool=cfg.query_pool,
            temperature=cfg.temperature,
            text_blocks=text_blocks,
            block_indices=block_indices,
            backend=cfg.map_backend,
        )

    def record(self, ctx: "AttentionCall", est: DraftEstimate) -> None:
        """Add the estimate's fallback counts to the call's statistics (one host sync, only with stats on)."""
        if ctx.stats_enabled:
            counts = torch.stack([est.dense_rows.sum(), est.dense_cols.sum()]).tolist()
            ctx.add_stats(dense_rows=int(counts[0]), dense_cols=int(counts[1]))

    def mask(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", order: Order | None,
             text_blocks: torch.Tensor | None) -> "BlockMask":
        """The BlockMask of the draft selection; on the kernel path the selection kernel writes its rows (no
        compaction pass)."""
        est = self.estimate(q, k, order, text_blocks, block_indices=True, layer=ctx.layer)
        self.record(ctx, est)
        return est.block_mask(q.shape[-2])


class DraftMethod(PlannedMethod):
    """Draft low-resolution guidance in the model's own token order (see the module docstring)."""

    name = "draft"
    config_class = DraftConfig

    def build_stages(self) -> PlanStages:
        """No reordering; the draft selection."""
        return PlanStages(order=None, select=DraftSelection(self.cfg))
