"""Helpers that build block masks for :func:`dit_accel.kernels.block_sparse_attention`.

The mask type is torch's own :class:`torch.nn.attention.flex_attention.BlockMask`, so one mask runs on
our Triton kernel and on FlexAttention unchanged. The fields our kernel reads:

- ``kv_num_blocks`` ``[B, H, Q_BLOCKS]`` int32: how many key blocks query block ``qb`` attends to;
- ``kv_indices`` ``[B, H, Q_BLOCKS, KV_BLOCKS]`` int32: the first ``kv_num_blocks[b, h, qb]`` entries are
  the key-block indices of that row (the rest is padding and never read);
- ``full_kv_num_blocks`` / ``full_kv_indices`` (optional): the same for FlexAttention's "full" blocks;
  our kernel computes them exactly like the partial ones, since it only supports the default
  ``mask_mod`` (``noop_mask``: every listed block is attended to in full);
- ``BLOCK_SIZE = (Q_BLOCK_SIZE, KV_BLOCK_SIZE)`` and ``seq_lengths = (q_len, kv_len)``.

``B`` and ``H`` of a mask may be 1 and are then broadcast over the batch and heads of q, k, v.
The helpers here put every selected block into ``kv_num_blocks``/``kv_indices`` (ascending key-block
order) with ``mask_mod=None`` (noop), and skip the transposed q-side indices (forward only).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "block_mask_density",
    "block_mask_from_bool",
    "block_mask_from_indices",
    "block_mask_from_scores",
    "dense_block_mask",
    "num_blocks",
]

DEFAULT_BLOCK_SIZE = 128
"""Default query and key block size, FlexAttention's default."""


def num_blocks(length: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` needed to cover ``length`` tokens (last block may be ragged)."""
    return (length + block_size - 1) // block_size


@functools.lru_cache(maxsize=32)
def _columns(count: int, device: torch.device) -> Tensor:
    """``arange(count)`` int32 on ``device`` (cached: one tensor per block count and device, never written)."""
    return torch.arange(count, dtype=torch.int32, device=device)


def _check_lengths(q_len: int, kv_len: int, block_size: int) -> None:
    if block_size not in (64, 128):
        raise ValueError(f"block_size must be 64 or 128, got {block_size}")
    if q_len <= 0 or kv_len <= 0:
        raise ValueError(f"q_len and kv_len must be positive, got q_len={q_len}, kv_len={kv_len}")


def _from_rows(kv_num: Tensor, kv_idx: Tensor, q_len: int, kv_len: int, block_size: int) -> BlockMask:
    """The BlockMask of compacted rows (every helper here ends in it; no query-side blocks: the kernels read
    the key-side rows only)."""
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, BLOCK_SIZE=block_size, seq_lengths=(q_len, kv_len), compute_q_blocks=False
    )


def dense_block_mask(
    B: int,
    H: int,
    q_len: int,
    kv_len: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: torch.device | str | None = None,
) -> BlockMask:
    """A BlockMask in which every query block attends to every key block (density 1.0).

    Args:
        B: batch size of the mask (1 broadcasts over the batch).
        H: number of heads of the mask (1 broadcasts over the heads).
        q_len: number of query tokens.
        kv_len: number of key/value tokens.
        block_size: query and key block size (64 or 128).
        device: device of the index tensors (put them where q, k, v live).
    """
    _check_lengths(q_len, kv_len, block_size)
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    kv_num = torch.full((B, H, qb), kb, dtype=torch.int32, device=device)
    kv_idx = torch.arange(kb, dtype=torch.int32, device=device).expand(B, H, qb, kb).contiguous()
    return _from_rows(kv_num, kv_idx, q_len, kv_len, block_size)


def block_mask_from_bool(
    block_bool: Tensor, q_len: int, kv_len: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """A BlockMask from a boolean block matrix: ``block_bool[b, h, qb, kb]`` is True where query block
    ``qb`` attends to key block ``kb``.

    Args:
        block_bool: bool tensor ``[B, H, Q_BLOCKS, KV_BLOCKS]`` with ``Q_BLOCKS = ceil(q_len / block_size)``
            and ``KV_BLOCKS = ceil(kv_len / block_size)``; B or H may be 1 (broadcast). A row with no True
            entry is an empty query block: its output is zeros and its LSE is -inf.
        q_len: number of query tokens.
        kv_len: number of key/value tokens.
        block_size: query and key block size (64 or 128).
    """
    _check_lengths(q_len, kv_len, block_size)
    if not isinstance(block_bool, Tensor) or block_bool.dtype != torch.bool or block_bool.dim() != 4:
        raise ValueError(
            "block_bool must be a 4-D bool tensor [B, H, Q_BLOCKS, KV_BLOCKS], got "
            f"{type(block_bool).__name__} {getattr(block_bool, 'dtype', None)} {tuple(getattr(block_bool, 'shape', ()))}"
        )
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if tuple(block_bool.shape[-2:]) != (qb, kb):
        raise ValueError(
            f"block_bool has shape {tuple(block_bool.shape)} but q_len={q_len}, kv_len={kv_len}, "
            f"block_size={block_size} need [B, H, {qb}, {kb}]"
        )
    # Compaction without a sort (a segmented stable sort cost 0.11 ms at Wan-1.3B 480p on an H100): the
    # selected key blocks first in ascending order, then the others in ascending order as padding, i.e. the
    # permutation a stable sort on "not selected" gives. With ``before`` the number of selected columns up
    # to and including column j, a selected j goes to ``before - 1`` and an unselected one after the
    # ``kv_num`` selected ones, to ``kv_num + (j + 1 - before) - 1``. int32 arithmetic (half the memory
    # traffic of int64); only the scatter needs int64 positions.
    cols = _columns(kb, block_bool.device)
    before = block_bool.cumsum(dim=-1, dtype=torch.int32)
    kv_num = before[..., -1].clone(memory_format=torch.contiguous_format)  # a copy: before changes below
    unselected = torch.sub(cols, before).add_(kv_num.unsqueeze(-1))
    pos = torch.where(block_bool, before.sub_(1), unselected).long()
    kv_idx = torch.empty(block_bool.shape, dtype=torch.int32, device=block_bool.device)
    kv_idx.scatter_(-1, pos, cols.expand(block_bool.shape))
    return _from_rows(kv_num, kv_idx, q_len, kv_len, block_size)


def block_mask_from_indices(
    kv_num_blocks: Tensor, kv_indices: Tensor, q_len: int, kv_len: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """A BlockMask from rows already compacted on the device, e.g. by the draft selection kernel
    (:func:`dit_accel.kernels.draft_map.select_blocks_triton` with ``indices=True``), which writes them
    exactly as :func:`block_mask_from_bool` would: no device work here, only shape checks.

    Args:
        kv_num_blocks: int32 ``[B, H, Q_BLOCKS]``, the number of attended key blocks per query block.
        kv_indices: int32 ``[B, H, Q_BLOCKS, KV_BLOCKS]``, per row the attended key blocks first (ascending, as
            every helper here lists them), the rest padding.
        q_len: number of query tokens.
        kv_len: number of key/value tokens.
        block_size: query and key block size (64 or 128).
    """
    _check_lengths(q_len, kv_len, block_size)
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if kv_indices.dtype != torch.int32 or kv_indices.dim() != 4 or tuple(kv_indices.shape[-2:]) != (qb, kb):
        raise ValueError(f"kv_indices must be int32 [B, H, {qb}, {kb}], got "
                         f"{kv_indices.dtype} {tuple(kv_indices.shape)}")
    if kv_num_blocks.dtype != torch.int32 or tuple(kv_num_blocks.shape) != tuple(kv_indices.shape[:-1]):
        raise ValueError(f"kv_num_blocks must be int32 {list(kv_indices.shape[:-1])}, got "
                         f"{kv_num_blocks.dtype} {tuple(kv_num_blocks.shape)}")
    return _from_rows(kv_num_blocks, kv_indices, q_len, kv_len, block_size)


def block_mask_from_scores(
    scores: Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    min_blocks: int = 1,
    keep_diagonal: bool = True,
    q_len: int,
    kv_len: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> BlockMask:
    """A BlockMask that keeps, for every query block, the key blocks with the largest scores.

    Args:
        scores: ``[B, H, Q_BLOCKS, KV_BLOCKS]`` block scores, non-negative masses for ``top_p`` (for
            example a pooled, softmaxed attention map; apply a softmax to logits first). Any float dtype.
        top_k: keep the ``top_k`` highest-scoring key blocks of each row.
        top_p: keep the fewest highest-scoring key blocks whose scores sum to at least ``top_p`` times the
            row's total (0 < top_p <= 1). With ``top_k`` too, at most ``top_k`` of them are kept.
        min_blocks: keep at least this many key blocks per row (the highest-scoring ones).
        keep_diagonal: always keep key block ``qb`` for query block ``qb`` (when it exists): a token's own
            neighbourhood, as in self-attention.
        q_len: number of query tokens.
        kv_len: number of key/value tokens.
        block_size: query and key block size (64 or 128).
    """
    _check_lengths(q_len, kv_len, block_size)
    if top_k is None and top_p is None:
        raise ValueError("block_mask_from_scores needs top_k, top_p or both; got neither")
    if not isinstance(scores, Tensor) or scores.dim() != 4 or not scores.is_floating_point():
        raise ValueError(
            f"scores must be a 4-D float tensor [B, H, Q_BLOCKS, KV_BLOCKS], got {tuple(getattr(scores, 'shape', ()))}"
        )
    qb, kb = num_blocks(q_len, block_size), num_blocks(kv_len, block_size)
    if tuple(scores.shape[-2:]) != (qb, kb):
        raise ValueError(
            f"scores has shape {tuple(scores.shape)} but q_len={q_len}, kv_len={kv_len}, "
            f"block_size={block_size} need [B, H, {qb}, {kb}]"
        )
    if top_k is not None and not (1 <= top_k):
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if min_blocks < 0:
        raise ValueError(f"min_blocks must be >= 0, got {min_blocks}")

    s = scores.float()
    order = torch.argsort(s, dim=-1, descending=True)
    n_keep = torch.full(s.shape[:-1], kb, dtype=torch.int64, device=s.device)
    if top_p is not None:
        if bool((s < 0).any()):
            raise ValueError("top_p needs non-negative scores (masses); apply a softmax to logits first")
        sorted_s = torch.gather(s, -1, order)
        cum = sorted_s.cumsum(-1)
        total = cum[..., -1:]
        # Number of blocks needed so that the kept mass reaches top_p of the total.
        n_keep = (cum < top_p * total).sum(-1) + 1
    if top_k is not None:
        n_keep = n_keep.clamp(max=top_k)
    n_keep = n_keep.clamp(min=min(min_blocks, kb), max=kb)
    rank_keep = torch.arange(kb, device=s.device) < n_keep.unsqueeze(-1)
    keep = torch.zeros_like(rank_keep).scatter(-1, order, rank_keep)
    if keep_diagonal:
        diag = torch.arange(min(qb, kb), device=s.device)
        keep[:, :, diag, diag] = True
    return block_mask_from_bool(keep, q_len, kv_len, block_size)


def block_mask_density(mask: BlockMask) -> float:
    """Fraction of (query block, key block) tiles the mask computes, averaged over its batch and heads
    (partial and full blocks together; 1.0 for a dense mask). Synchronises with the device."""
    b, h, qb, kb = mask.kv_indices.shape
    count = mask.kv_num_blocks.sum(dtype=torch.int64)
    if mask.full_kv_num_blocks is not None:
        count = count + mask.full_kv_num_blocks.sum(dtype=torch.int64)
    return float(count.item()) / float(b * h * qb * kb)
