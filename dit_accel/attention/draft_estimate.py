"""The draft map and its top-p selection: the estimate the draft-based methods plan from.

Per call (all on the device, no host synchronisation):

1. mean-pool q and k over each kernel block (the last block may be ragged);
2. block logits ``scale / temperature * q_sub . k_pool`` plus, optionally, ``log(tokens in the key block)``
   (a block's mass is roughly its size times one token's weight), softmax over key blocks, where
   ``q_sub`` are means of ``query_pool`` consecutive query tokens and the probabilities of the sub-blocks of a
   query block are averaged: the rows of one 128-token query block attend to different key blocks, so one
   pooled query makes the map too peaked (too few blocks for the rows that need many);
3. per query block keep the fewest key blocks whose estimated mass reaches ``top_p``, at least
   ``min_blocks_fraction`` of the key blocks, and always the diagonal block;
4. always computed: every row and column of a block holding text tokens (joint-attention families),
   the whole row of a query block and the whole column of a key block whose tokens pooling cannot
   represent (mean cosine similarity of the block's tokens to their mean below
   ``similarity_threshold``: SpargeAttn's self-similarity check).

The map and the selection run as fused Triton kernels (:mod:`dit_accel.kernels.draft_map`) where they apply,
else in torch (the reference, what CPU runs); on the kernel path the selection kernel also writes the
BlockMask's rows (:meth:`DraftEstimate.block_mask`), so no separate compaction pass runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch

from dit_accel.attention.blocks import BLOCK, Order, permute_tokens, runs_contiguous
from dit_accel.checks import check_choice
from dit_accel.kernels import block_mask_from_bool, block_mask_from_indices

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def _perm_tensor(perm: torch.Tensor | Order | None) -> torch.Tensor | None:
    """The permutation tensor of ``perm`` (an :class:`Order` or already a tensor)."""
    return perm.perm if isinstance(perm, Order) else perm


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


def query_sub_means(x: torch.Tensor, perm: torch.Tensor | Order | None, group: int, block: int = BLOCK
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of every ``group`` consecutive tokens of the planned order, padded to whole blocks.

    Args:
        x: ``(B, H, S, D)`` in the model's token order.
        perm: the planned order (``(S,)`` or ``(B, H, S)``, or an :class:`Order`, which keeps the contiguity
            check below; ``None``: the model's order).
        group: tokens per sub-block; divides ``block``.
    Returns:
        ``(means (B, H, NB * block // group, D) float32, counts (NB * block // group,) float32)``: sub-blocks
        past the end of the sequence have count 0 and mean 0.

    When each aligned group of the planned order is an aligned run of the model's order (raster order,
    or 3D tiles whose width is a multiple of ``group``), the means are taken before the permutation: a
    view and a mean over ``x`` plus a gather of ``S / group`` rows, no permuted copy of ``x``.
    """
    order = perm if isinstance(perm, Order) else None
    perm = _perm_tensor(perm)
    B, H, S, D = x.shape
    nb = -(-S // block)
    n_sub = nb * block // group
    counts = (torch.arange(n_sub, device=x.device) * group).sub(S).neg().clamp(0, group).float()
    if S % group == 0 and (perm is None or perm.dim() == 1):
        runs = None if perm is None else perm.view(-1, group)
        contiguous = perm is None or (order.runs_contiguous(group) if order is not None else runs_contiguous(perm, group))
        if contiguous:
            means = x.unflatten(2, (S // group, group)).mean(-2, dtype=torch.float32)
            if runs is not None:
                means = means.index_select(2, runs[:, 0] // group)
            pad = n_sub - S // group
            return torch.nn.functional.pad(means, (0, 0, 0, pad)), counts
    xp = permute_tokens(x, perm)
    xp = torch.nn.functional.pad(xp, (0, 0, 0, nb * block - S))
    sums = xp.unflatten(2, (n_sub, group)).sum(-2, dtype=torch.float32)
    return sums / counts.clamp_min(1)[:, None], counts


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
    kv_num_blocks: torch.Tensor | None = None
    """``(B, H, QB)`` int32: the BlockMask rows of ``keep`` as the selection kernel wrote them (``None`` on the
    torch path or when not asked for)."""
    kv_indices: torch.Tensor | None = None
    """``(B, H, QB, KB)`` int32: with ``kv_num_blocks``, exactly what :func:`block_mask_from_bool` makes of
    ``keep``."""

    def block_mask(self, seq_len: int) -> "BlockMask":
        """The BlockMask of ``keep`` for ``seq_len`` tokens: from the kernel's rows when it wrote them (no
        compaction pass), else compacted by :func:`block_mask_from_bool` (the torch path)."""
        if self.kv_num_blocks is not None and self.kv_indices is not None:
            return block_mask_from_indices(self.kv_num_blocks, self.kv_indices, seq_len, seq_len)
        return block_mask_from_bool(self.keep, seq_len, seq_len)


_DRAFT_MAP_CHUNK_ELEMENTS = 1 << 25
"""Largest sub-query draft map built at once (elements): 32 M, i.e. 64-128 MB; one chunk at Wan-1.3B 480p."""


class DraftMap(NamedTuple):
    """The draft map of one call and the per-block self-similarities, all in the planned token order."""

    probs: torch.Tensor
    """``(B, H, QB, KB)`` float32: estimated share of each query block's attention per key block."""
    q_similarity: torch.Tensor
    """``(B, H, QB)`` float32: mean cosine similarity of a query block's sampled tokens to its mean."""
    k_similarity: torch.Tensor
    """``(B, H, KB)`` float32: the same for the key blocks."""


def draft_map_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    perm: torch.Tensor | Order | None = None,
    pool: torch.Tensor | None = None,
    query_pool: int = BLOCK,
    scale: float,
    log_block_size: bool = True,
    block: int = BLOCK,
) -> DraftMap:
    """The draft map in torch (the reference of :mod:`dit_accel.kernels.draft_map`; what CPU runs).

    ``q``, ``k`` ``(B, H, S, D)`` in the model's order; blocks formed in the order ``perm`` (``pool``: its
    averaging matrix, see :func:`block_pool`; a shared :class:`Order` brings its own when ``pool`` is
    ``None``); ``query_pool`` query tokens per sub-query (a divisor of
    ``block``); ``scale`` multiplies the pooled logits (temperature included); ``log_block_size`` adds
    ``log(tokens in the key block)``. Each sub-query's softmax over the key-block means is computed and a
    query block's row is their token-weighted mean.
    """
    if pool is None and isinstance(perm, Order):
        pool = perm.pool(q.dtype)
    qp, q_sim, counts = block_pool(q, _perm_tensor(perm), pool, block)
    kp, k_sim, _ = block_pool(k, _perm_tensor(perm), pool, block)
    bias = counts.log() if log_block_size else torch.zeros_like(counts)
    if query_pool >= block:
        probs = torch.softmax((qp @ kp.transpose(-1, -2)) * scale + bias, dim=-1)
    else:
        group = block // query_pool
        qs, sub_counts = query_sub_means(q, perm, query_pool, block)
        weights = (sub_counts / sub_counts.view(-1, group).sum(-1).repeat_interleave(group))
        key_t = kp.transpose(-1, -2)
        # The sub-query map is (B, H, NB*G, KB): 1.8 GB in float32 at Wan-14B 720p with 40 heads. Rows are
        # independent, so it is built a few query blocks at a time (same values, bounded transient memory).
        per_block = max(1, qs.shape[0] * qs.shape[1] * group * key_t.shape[-1])
        step = max(1, _DRAFT_MAP_CHUNK_ELEMENTS // per_block)
        chunks = []
        for start in range(0, qs.shape[-2] // group, step):
            rows = slice(start * group, (start + step) * group)
            sub_probs = torch.softmax((qs[..., rows, :] @ key_t) * scale + bias, dim=-1)  # (B, H, n*G, KB)
            chunks.append((sub_probs * weights[rows, None]).unflatten(2, (-1, group)).sum(-2))
        probs = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=2)
    return DraftMap(probs, q_sim, k_sim)


MapBackend = Literal["auto", "triton", "torch"]
"""Backend of the draft map and of :func:`draft_estimate`'s selection."""

DRAFT_MAP_BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
"""The :data:`MapBackend` values. ``auto``: the Triton kernels of :mod:`dit_accel.kernels.draft_map` (map;
top-p + protected tiles) where they apply (CUDA, or CPU under ``TRITON_INTERPRET=1``; head dim 64 or 128;
float16/bfloat16/float32; 128-token blocks), else the torch reference (:func:`draft_map_reference`,
:func:`top_p_keep`); ``triton``: the kernels; ``torch``: the reference."""


def draft_map_uses_kernel(q: torch.Tensor, backend: MapBackend = "auto", block: int = BLOCK) -> bool:
    """Whether ``backend`` runs the Triton kernels (map and selection) for ``q``."""
    check_choice("backend", backend, DRAFT_MAP_BACKENDS)
    return backend == "triton" or (backend == "auto" and draft_map_kernel_applies(q, block))


def draft_map_kernel_applies(q: torch.Tensor, block: int = BLOCK) -> bool:
    """Whether the fused kernel takes this call (see :data:`DRAFT_MAP_BACKENDS`). The head dims and dtypes are
    the kernel module's ``DRAFT_MAP_HEAD_DIMS`` / ``DRAFT_MAP_DTYPES``, spelled out so that importing this
    module does not import Triton (tests/test_draft_map_kernel.py checks they agree)."""
    on_triton = q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"
    return (on_triton and block == 128 and q.shape[-1] in (64, 128)
            and q.dtype in (torch.float16, torch.bfloat16, torch.float32))


def draft_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    perm: torch.Tensor | Order | None = None,
    pool: torch.Tensor | None = None,
    query_pool: int = BLOCK,
    scale: float,
    log_block_size: bool = True,
    block: int = BLOCK,
    backend: MapBackend = "auto",
) -> DraftMap:
    """The draft map (arguments as :func:`draft_map_reference`): the fused Triton kernel
    (:func:`dit_accel.kernels.draft_map.draft_map_triton`) where it applies, else the torch reference.

    The two agree to float32 rounding in the interpreter (1e-7). On CUDA the kernel's score GEMM runs in tf32
    (map entries within 1.6e-3 relative of a float32 reference at the Wan shapes), and with ``pool`` on
    bf16/fp16 inputs the reference's block means are rounded to the input dtype (pooling GEMM in that
    dtype: 6.7e-3 relative) while the kernel keeps them in float32; the selections agree on >= 99.94 % of
    the tiles (the ``map_check`` rows of ``benchmarks/sparse_speed.py`` measure this).
    ``backend``: one of :data:`DRAFT_MAP_BACKENDS`.
    """
    if draft_map_uses_kernel(q, backend, block):
        from dit_accel.kernels.draft_map import draft_map_triton

        probs, q_sim, k_sim = draft_map_triton(q, k, perm=_perm_tensor(perm), query_pool=query_pool, scale=scale,
                                               log_block_size=log_block_size, block=block)
        return DraftMap(probs, q_sim, k_sim)
    return draft_map_reference(q, k, perm=perm, pool=pool, query_pool=query_pool, scale=scale,
                               log_block_size=log_block_size, block=block)


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
    perm: torch.Tensor | Order | None = None,
    pool: torch.Tensor | None = None,
    query_pool: int = BLOCK,
    temperature: float = 1.0,
    block: int = BLOCK,
    block_indices: bool = False,
    backend: MapBackend = "auto",
) -> DraftEstimate:
    """Draft map and top-p selection for ``(B, H, S, D)`` q and k in the model's order, blocks formed in
    the planned order ``perm`` (``pool``: its averaging matrix, see :func:`block_pool`), on ``backend``.

    ``text_blocks`` ``(NB,)`` bool marks blocks holding text tokens (their rows and columns are kept).
    ``query_pool`` tokens per query sub-block (divides ``block``; ``block``: one pooled query per block):
    each sub-block's softmax over the key blocks is computed and a query block's map is their
    token-weighted mean. ``temperature`` divides the draft logits (> 1 flattens the map).
    ``block_indices``: have the selection kernel also write the BlockMask rows of ``keep``
    (:attr:`DraftEstimate.kv_indices`; the torch path leaves them ``None``, :meth:`DraftEstimate.block_mask`
    then compacts ``keep``). Only callers that turn ``keep`` itself into the mask ask: the rows cost a write of
    ``(B, H, QB, KB)`` int32.
    """
    D = q.shape[-1]
    scale = (1.0 / math.sqrt(D) if scale is None else scale) / temperature
    kernel = draft_map_uses_kernel(q, backend, block)
    probs, q_sim, k_sim = draft_map(q, k, perm=perm, pool=pool, query_pool=min(query_pool, block), scale=scale,
                                    log_block_size=log_block_size, block=block, backend="triton" if kernel else "torch")
    nb = probs.shape[-1]
    min_blocks = max(1, math.ceil(min_blocks_fraction * nb))
    dense_rows = q_sim < similarity_threshold
    dense_cols = k_sim < similarity_threshold
    if kernel:
        # top-p (bisection, no sort), the protected tiles and (block_indices) the BlockMask rows in one pass
        from dit_accel.kernels.draft_map import select_blocks_triton

        sel = select_blocks_triton(probs, q_sim, k_sim, top_p=top_p, min_blocks=min_blocks,
                                   similarity_threshold=similarity_threshold, text_blocks=text_blocks,
                                   indices=block_indices)
        return DraftEstimate(probs, sel.keep, sel.protect, dense_rows, dense_cols, sel.kv_num_blocks, sel.kv_indices)
    keep = top_p_keep(probs, top_p, min_blocks)
    always = torch.eye(nb, dtype=torch.bool, device=q.device)
    if text_blocks is not None:
        always = always | text_blocks.view(nb, 1) | text_blocks.view(1, nb)
    protect = (dense_rows.unsqueeze(-1) | dense_cols.unsqueeze(-2)) | always
    return DraftEstimate(probs, keep | protect, protect, dense_rows, dense_cols)


