"""``draft``: draft low-resolution guidance. Pool Q and K per 128-token block, compute the
low-resolution attention map, keep per query block the key blocks that hold a top-p share of its mass.

Per call (all on the device, no host synchronisation):

1. mean-pool q and k over each kernel block (the last block may be ragged);
2. block logits ``scale * q_pool . k_pool`` plus, optionally, ``log(tokens in the key block)`` (a block's
   mass is roughly its size times one token's weight), softmax over key blocks;
3. per query block keep the fewest key blocks whose estimated mass reaches ``top_p``, at least
   ``min_blocks_fraction`` of the key blocks, and always the diagonal block;
4. always computed: every row and column of a block holding text tokens (joint-attention families),
   the whole row of a query block and the whole column of a key block whose tokens pooling cannot
   represent (mean cosine similarity of the block's tokens to their mean below
   ``similarity_threshold``: SpargeAttn's self-similarity check).

:class:`PlannedMethod` is the skeleton shared by the sparse methods (safety valves, token order,
selection, statistics); ``permuted``, ``temporal_skip`` and ``combo`` override its ``order`` and
``select`` steps.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from dit_accel.attention.methods import SparsePlan, register_method
from dit_accel.attention.sparse_base import (
    BLOCK,
    ConfiguredMethod,
    SparseConfig,
    add_call_stats,
    blocks_touching,
    check_range,
    safety_reason,
    stats_enabled,
    text_token_mask,
)
from dit_accel.kernels import block_mask_from_bool

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from dit_accel.context import AttentionCall


def permute_tokens(x: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``(B, H, S, D)`` in the order ``perm`` (``(S,)`` or ``(B, H, S)``; ``None``: unchanged)."""
    if perm is None:
        return x
    if perm.dim() == 1:
        return x.index_select(2, perm)
    return torch.gather(x, 2, perm[..., None].expand(-1, -1, -1, x.shape[-1]))


SIMILARITY_SAMPLE = 32
"""Tokens per block (evenly strided) on which the self-similarity check runs; the mean uses every token."""


def pool_matmul(pool: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``pool @ x`` for ``pool`` ``(NB, S)`` and ``x`` ``(B, H, S, D)`` -> ``(B, H, NB, D)``, reading ``x`` once.

    Diffusers hands q and k over as ``(B, S, H, D)`` memory viewed as ``(B, H, S, D)``; then this is one
    plain GEMM per batch row over ``(S, H*D)``, with no copy of ``x``.
    """
    B, H, S, D = x.shape
    nb = pool.shape[0]
    pool = pool.to(x.dtype)
    bshd = x.transpose(1, 2)
    if bshd.is_contiguous():
        return (pool @ bshd.reshape(B, S, H * D)).view(B, nb, H, D).transpose(1, 2)
    return torch.matmul(pool, x)


def block_pool(
    x: torch.Tensor, perm: torch.Tensor | None = None, pool: torch.Tensor | None = None, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean of each block of the planned token order and how well the mean represents the block.

    Args:
        x: ``(B, H, S, D)`` in the model's token order.
        perm: the planned order (``(S,)`` or ``(B, H, S)``; ``None``: the model's order).
        pool: optional ``(NB, S)`` averaging matrix of a shared ``perm`` (:func:`pool_matrix`): the means
            are then one GEMM over ``x`` instead of a gather plus a sum.
    Returns:
        ``(mean (B, H, NB, D) float32, similarity (B, H, NB) float32, counts (NB,) float32)``, where
        ``similarity`` is the mean cosine similarity to the block mean of :data:`SIMILARITY_SAMPLE`
        evenly strided tokens of the block.
    """
    B, H, S, D = x.shape
    nb = -(-S // block)
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = S - (nb - 1) * block
    if pool is not None:
        mean = pool_matmul(pool, x).float()
    else:
        xp = permute_tokens(x, perm)
        full = (S // block) * block
        sums = xp[:, :, :full].unflatten(2, (S // block, block)).sum(-2, dtype=torch.float32)
        if full < S:
            sums = torch.cat([sums, xp[:, :, full:].sum(-2, keepdim=True, dtype=torch.float32)], dim=2)
        mean = sums / counts[:, None]
    stride = max(1, block // SIMILARITY_SAMPLE)
    pos = torch.arange(nb, device=x.device)[:, None] * block + torch.arange(0, block, stride, device=x.device)
    valid = pos < S
    pos = pos.clamp(max=S - 1).reshape(-1)
    if perm is not None:
        pos = perm[..., pos]
    sample = permute_tokens(x, pos).float().unflatten(2, (nb, -1))  # (B, H, NB, sample, D)
    dots = (sample @ mean.unsqueeze(-1)).squeeze(-1)
    cos = dots / (sample.norm(dim=-1) * mean.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    similarity = (cos * valid).sum(-1) / valid.sum(-1)
    return mean, similarity, counts


def pool_matrix(perm: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``(NB, S)`` float32 matrix averaging the tokens of each block of the order ``perm`` ``(S,)``:
    row ``b`` holds ``1 / count_b`` at the original positions of block ``b``'s tokens."""
    S = perm.shape[0]
    nb = -(-S // block)
    blocks = torch.arange(S, device=perm.device) // block
    counts = torch.bincount(blocks, minlength=nb).float()
    pool = torch.zeros(nb, S, device=perm.device)
    pool[blocks, perm] = 1.0 / counts[blocks]
    return pool


def top_p_keep(probs: torch.Tensor, top_p: float, min_blocks: int) -> torch.Tensor:
    """Bool mask keeping, per row of ``probs`` ``(..., KB)``, the fewest highest entries holding ``top_p``
    of the row's mass, and at least ``min_blocks`` entries. ``top_p >= 1`` keeps everything."""
    kb = probs.shape[-1]
    if top_p >= 1.0 or min_blocks >= kb:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    cum = sorted_p.cumsum(-1)
    n_keep = (cum < top_p * cum[..., -1:]).sum(-1, keepdim=True) + 1
    n_keep = n_keep.clamp(min=max(min_blocks, 1), max=kb)
    rank_keep = torch.arange(kb, device=probs.device) < n_keep
    return torch.zeros_like(rank_keep).scatter(-1, order, rank_keep)


_POOL_CACHE: dict[int, tuple["weakref.ref[torch.Tensor]", torch.dtype, torch.Tensor]] = {}


def cached_pool_matrix(perm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`pool_matrix` of a shared ``(S,)`` order, cached per order tensor (the tile orders are cached
    objects, so this is built once per grid and device); ``None`` for no or per-head orders."""
    if perm is None or perm.dim() != 1:
        return None
    hit = _POOL_CACHE.get(id(perm))
    if hit is not None and hit[0]() is perm and hit[1] == dtype:
        return hit[2]
    pool = pool_matrix(perm).to(dtype)
    for key in [k for k, v in _POOL_CACHE.items() if v[0]() is None]:
        del _POOL_CACHE[key]
    _POOL_CACHE[id(perm)] = (weakref.ref(perm), dtype, pool)
    return pool


@dataclass
class DraftEstimate:
    """The draft map of one call and the selection made from it (all in the planned token order)."""

    probs: torch.Tensor
    """``(B, H, QB, KB)`` float32: estimated share of each query block's attention per key block."""
    keep: torch.Tensor
    """``(B, H, QB, KB)`` bool: the selection, protected tiles included."""
    protect: torch.Tensor
    """``(B, H, QB, KB)`` bool: tiles always computed (diagonal, text, blocks pooling cannot represent)."""
    dense_rows: torch.Tensor
    """``(B, H, QB)`` bool: query blocks computed densely because pooling cannot represent them."""
    dense_cols: torch.Tensor
    """``(B, H, KB)`` bool: key blocks kept for every query block because pooling cannot represent them."""


def draft_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    top_p: float,
    min_blocks_fraction: float,
    similarity_threshold: float,
    log_block_size: bool = True,
    scale: float | None = None,
    text_blocks: torch.Tensor | None = None,
    perm: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    block: int = BLOCK,
) -> DraftEstimate:
    """Draft map and top-p selection for ``(B, H, S, D)`` q and k in the model's order, blocks formed in
    the planned order ``perm`` (``pool``: its averaging matrix, see :func:`block_pool`).

    ``text_blocks`` ``(NB,)`` bool marks blocks holding text tokens (their rows and columns are kept).
    """
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qp, q_sim, counts = block_pool(q, perm, pool, block)
    kp, k_sim, _ = block_pool(k, perm, pool, block)
    logits = (qp @ kp.transpose(-1, -2)) * scale
    if log_block_size:
        logits = logits + counts.log()
    probs = torch.softmax(logits, dim=-1)
    nb = probs.shape[-1]
    min_blocks = max(1, math.ceil(min_blocks_fraction * nb))
    keep = top_p_keep(probs, top_p, min_blocks)
    dense_rows = q_sim < similarity_threshold
    dense_cols = k_sim < similarity_threshold
    protect = torch.eye(nb, dtype=torch.bool, device=q.device).expand_as(keep).clone()
    protect |= dense_rows.unsqueeze(-1) | dense_cols.unsqueeze(-2)
    if text_blocks is not None:
        protect |= text_blocks.view(1, 1, nb, 1) | text_blocks.view(1, 1, 1, nb)
    return DraftEstimate(probs, keep | protect, protect, dense_rows, dense_cols)


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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("min_blocks_fraction", self.min_blocks_fraction, 0.0, 1.0)
        check_range("similarity_threshold", self.similarity_threshold, -1.0, 1.0)
        if not isinstance(self.log_block_size, bool):
            raise ValueError(f"log_block_size must be a bool, got {self.log_block_size!r}")
        if self.scale is not None:
            check_range("scale", self.scale, 0.0, math.inf, lo_open=True)


class PlannedMethod(ConfiguredMethod):
    """Skeleton of the sparse methods: safety valves, then ``order`` (token permutation), then ``select``
    (bool block mask in that order), then the BlockMask. Subclasses override the two steps."""

    config_class: ClassVar[type[SparseConfig]] = DraftConfig
    order_name: ClassVar[str] = "none"
    """Token order recorded in statistics (``none``, ``tile``, ``kmeans``)."""

    def plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        """Dense (``None``) when a safety valve applies, else the planned mask (and permutation)."""
        reason = safety_reason(self.cfg, ctx)
        if reason is not None:
            add_call_stats(ctx, sparse_off=reason)
            return None
        return self._plan(q, k, ctx)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> "BlockMask | SparsePlan | None":
        S = q.shape[-2]
        text = text_token_mask(ctx.layout, S, q.device)
        text_blocks = blocks_touching(text) if text is not None else None
        perm = self.order(q, k, ctx)
        keep = self.select(q, k, ctx, perm, text_blocks)
        mask = block_mask_from_bool(keep, S, S)
        return mask if perm is None else SparsePlan(mask, perm)

    def order(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall") -> torch.Tensor | None:
        """Token permutation for this call (``None``: the model's own order)."""
        return None

    def select(self, q: torch.Tensor, k: torch.Tensor, ctx: "AttentionCall", perm: torch.Tensor | None,
               text_blocks: torch.Tensor | None) -> torch.Tensor:
        """Bool ``(B, H, QB, KB)`` block mask in the order ``perm``: the draft selection."""
        est = self.estimate(q, k, perm, text_blocks)
        self.record_estimate(ctx, est)
        return est.keep

    def estimate(self, q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor | None,
                 text_blocks: torch.Tensor | None) -> DraftEstimate:
        """The draft estimate of this call in the order ``perm``, with the configured thresholds."""
        cfg = self.cfg
        return draft_estimate(
            q,
            k,
            perm=perm,
            pool=cached_pool_matrix(perm, q.dtype),
            top_p=cfg.resolved("top_p"),
            min_blocks_fraction=cfg.resolved("min_blocks_fraction"),
            similarity_threshold=cfg.resolved("similarity_threshold"),
            log_block_size=cfg.log_block_size,
            scale=cfg.scale,
            text_blocks=text_blocks,
        )

    def record_estimate(self, ctx: "AttentionCall", est: DraftEstimate) -> None:
        """Add the estimate's fallback counts to the call's statistics (one host sync, only with stats on)."""
        if stats_enabled(ctx):
            counts = torch.stack([est.dense_rows.sum(), est.dense_cols.sum()]).tolist()
            add_call_stats(ctx, order=self.order_name, dense_rows=int(counts[0]), dense_cols=int(counts[1]))


@register_method
class DraftMethod(PlannedMethod):
    """Draft low-resolution guidance in the model's own token order (see the module docstring)."""

    name = "draft"
    config_class = DraftConfig
