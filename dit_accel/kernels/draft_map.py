"""Fused draft map: block means, self-similarity and the pooled low-resolution attention map in Triton.

The draft selector (:mod:`dit_accel.attention.draft`) estimates, for every 128-token query block, which key
blocks hold its attention mass: it averages the softmaxes (over the key-block means) of the means of every
``query_pool`` consecutive query tokens, token-weighted. Written with torch ops this materialises a
``(S / query_pool) x blocks`` float32 map per head (1.8 GB at Wan-14B 720p x 40 heads) and costs 20-30 % of
a sparse attention call at Wan-1.3B 480p. Here one kernel does it in registers:

* pass 1 (``x`` = k): per key block its mean (float32) and the mean cosine similarity of every 4th token to
  that mean (the self-similarity check);
* pass 2 (``x`` = q, with the key means of pass 1): per query block the same similarity, the sub-query
  means (a small pooling GEMM over the block's rows), then two sweeps over the key-block means: an online
  max / sum of each sub-query's softmax, then the probabilities, weighted by the sub-queries' token counts
  and summed per query block. Only ``(B, H, QB, KB)`` float32 is written.

Tokens are read through an optional permutation (shared ``(S,)`` or per head ``(B, H, S)``), so the planned
order costs no permuted copy. The torch reference is :func:`dit_accel.attention.draft.draft_map_reference`
(the dispatcher :func:`dit_accel.attention.draft.draft_map` picks this kernel on CUDA and under
``TRITON_INTERPRET=1``, the reference on CPU).

Numerics: sums in float32. On the GPU the score GEMM (float32 sub-query means x float32 key means) runs in
:data:`SCORE_PRECISION` (tf32 by default: the map is within 1.6e-3 relative of the float32 reference, less
than the reference itself moves, 6.7e-3, when it pools a tile order by a bf16 GEMM); the sub-query sums of
16-bit inputs are one native MMA of a 0/1 matrix (exact products, float32 accumulation), of float32 inputs
a ``tf32x3`` one. Head dims other than 64 and 128 are not handled here (the tiles assume a power-of-two
head dim and only these were checked): the dispatcher runs the reference for them.

A second kernel, :func:`select_blocks_triton`, makes the selection from the map in one pass (top-p by an
exact bisection on the threshold instead of a sort, plus the protected tiles) and, when asked, writes the
BlockMask's ``kv_num_blocks`` / ``kv_indices`` rows itself (no separate compaction pass in the plan).

Speed on Hopper (bf16): map 0.36-0.37 ms at Wan-1.3B 480p (torch reference 1.54 ms), 3.6-3.8 ms at Wan-14B
720p (13.8-14.6 ms); selection 0.06-0.09 ms / 0.40 ms (torch top-p alone 0.18-0.23 / 1.08 ms).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "DRAFT_MAP_DTYPES", "DRAFT_MAP_HEAD_DIMS", "MAP_LAUNCH", "BlockSelection", "MapLaunch", "check_draft_map_inputs",
    "draft_map_triton", "select_blocks_triton",
]

DRAFT_MAP_HEAD_DIMS = (64, 128)
"""Head dims the kernel takes (others: the torch reference)."""

DRAFT_MAP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Input dtypes the kernel takes."""

KERNEL_BLOCK = 128
"""Token block of the kernel (the block-sparse kernel's block)."""

SIMILARITY_STRIDE = 4
"""Every 4th token of a block enters the similarity check (32 of 128, as the reference samples)."""


@dataclass(frozen=True)
class MapLaunch:
    """Launch parameters of the draft kernels: the map's two passes and the selection (tiling only: the map is the
    same up to float32 summation order, and so is the selection but for near-ties of its top-p mass sums).
    :data:`MAP_LAUNCH` is what :func:`draft_map_triton` and :func:`select_blocks_triton` use;
    ``benchmarks/draft_map_tune.py`` times alternatives on the GPU."""

    map_rows: int = 128
    """Sub-query rows per program of the query pass: ``map_rows // (128 // query_pool)`` query blocks share one
    program, so each program reads the key means once for several query blocks (>= 16: a ``tl.dot`` minimum)."""
    key_chunk: int = 64
    """Key blocks per step of the query pass's sweeps over the key means."""
    stages: int = 3
    """Software-pipeline stages of both passes (key-mean chunks in flight)."""
    map_warps: int = 8
    """Warps per program of the query pass (head dim 128; half for head dim 64)."""
    key_warps: int = 4
    """Warps per program of the key pass (head dim 128; half for head dim 64)."""
    select_warps: int = 1
    """Warps per 256 key blocks of a row program of the selection kernel (at most 8 warps): 1 at Wan-1.3B 480p
    (256 blocks), 4 at 14B 720p (591 blocks, padded to 1,024 lanes), as measured."""

    def __post_init__(self) -> None:
        allowed = {"map_rows": (16, 32, 64, 128, 256, 512), "key_chunk": (16, 32, 64, 128, 256),
                   "stages": (1, 2, 3, 4, 5), "map_warps": (1, 2, 4, 8, 16), "key_warps": (1, 2, 4, 8, 16),
                   "select_warps": (1, 2, 4, 8)}
        for name, values in allowed.items():
            value = getattr(self, name)
            if isinstance(value, bool) or value not in values:
                raise ValueError(f"MapLaunch.{name} must be one of {values}, got {value!r}")


MAP_LAUNCH = MapLaunch()
"""The launch in use, from two coordinate-descent searches at Wan-1.3B 480p on an H200 (the map fields; then
stages and selection warps, timing the whole estimate = map + selection with the BlockMask rows): estimate 0.389-0.392 vs 0.424-0.426 ms for the
first search's launch (4 stages, 4 selection warps) at 1.3B, timed alternately; 14B keeps 4
selection warps (one warp there changes a few near-tied selections: float32 sums in another order). 128 rows beat
32/64/256 (256: 2x slower) and 8 query-pass warps beat 4/16 by 1.2-2.5x; stages and key-pass warps move the map by
less than the run-to-run noise."""

SCORE_PRECISION = "tf32"
"""Precision of the score GEMM on the GPU: ``tf32`` (one tensor-core pass; map entries within 1.6e-3
relative of the float32 reference at the Wan shapes) or ``tf32x3`` (three passes, float32 accuracy: within
1e-6; the map takes 1.45x / 1.86x as long at Wan-1.3B 480p / 14B 720p). The
interpreter computes in float32."""


@triton.jit
def _key_chunk_scores(qs, kmean_base, kb, kvalid, d, S, scale_log2, BLOCK: tl.constexpr, D: tl.constexpr,
                      LOG_BIAS: tl.constexpr, SCORE_PREC: tl.constexpr):
    """Base-2 draft logits of the sub-queries ``qs`` against the key-block means ``kb`` (one chunk of a sweep):
    scaled scores, plus log2 of the blocks' token counts with ``LOG_BIAS``; -inf past the last key block."""
    km = tl.load(kmean_base + kb[:, None] * D + d[None, :], mask=kvalid[:, None], other=0.0)
    s = tl.dot(qs, tl.trans(km), input_precision=SCORE_PREC) * scale_log2
    if LOG_BIAS:
        s += tl.log2(tl.maximum(tl.minimum(S - kb * BLOCK, BLOCK), 1).to(tl.float32))[None, :]
    return tl.where(kvalid[None, :], s, float("-inf"))


@triton.jit
def _block_stats_and_map_kernel(
    x_ptr, idx_ptr, kmean_ptr, mean_out_ptr, sim_out_ptr, probs_ptr,
    S, H, NB,
    sxb, sxh, sxs,
    sib, sih,
    scale_log2,
    BLOCK: tl.constexpr, D: tl.constexpr, POOL: tl.constexpr, QPB: tl.constexpr,
    STRIDE: tl.constexpr, KB: tl.constexpr, BK: tl.constexpr,
    HAS_INDEX: tl.constexpr, WITH_MAP: tl.constexpr, LOG_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    SCORE_PREC: tl.constexpr, POOL_F32: tl.constexpr,
):
    """One program: ``QPB`` consecutive blocks of one (batch, head). Stores each block's similarity; without
    ``WITH_MAP`` also its mean (key pass), with it the draft map rows of these blocks (query pass)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    NSUB: tl.constexpr = BLOCK // POOL
    M: tl.constexpr = QPB * NSUB
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    x_base = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    if WITH_MAP:
        row = tl.arange(0, M)
        qs = tl.zeros((M, D), dtype=tl.float32)
    for i in range(QPB):
        blk = pid * QPB + i
        tokens = blk * BLOCK + r
        valid = tokens < S
        tokens = tl.minimum(tokens, S - 1)
        if HAS_INDEX:
            tokens = tl.load(idx_ptr + b.to(tl.int64) * sib + h.to(tl.int64) * sih + tokens)
        x_in = tl.load(x_base + tokens.to(tl.int64)[:, None] * sxs + d[None, :])
        x = tl.where(valid[:, None], x_in.to(tl.float32), 0.0)
        count = tl.maximum(tl.minimum(S - blk * BLOCK, BLOCK), 1).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        # self-similarity: mean cosine of every STRIDE-th valid token to the block mean
        sample = valid & (r % STRIDE == 0)
        dots = tl.sum(x * mean[None, :], axis=1)
        norms = tl.sqrt(tl.sum(x * x, axis=1)) * tl.sqrt(tl.sum(mean * mean, axis=0))
        cos = tl.where(sample, dots / tl.maximum(norms, 1e-12), 0.0)
        sim = tl.sum(cos, axis=0) / tl.maximum(tl.sum(sample.to(tl.float32), axis=0), 1.0)
        in_range = blk < NB
        tl.store(sim_out_ptr + bh * NB + blk, sim, mask=in_range)
        if WITH_MAP:
            # rows of block i: sub-query sums = ones (M, BLOCK) @ x (BLOCK, D) on the block's valid tokens. The
            # 0/1 matrix is exact in any dtype, so 16-bit inputs take one native MMA with float32 accumulation
            # (exact products); then a division by the token count, as the reference's float32 mean.
            sub = row - i * NSUB
            sub_count = tl.minimum(tl.maximum(S - (blk * BLOCK + sub * POOL), 0), POOL)
            mine = (sub >= 0) & (sub < NSUB)
            inv = tl.where(mine, 1.0 / tl.maximum(sub_count, 1).to(tl.float32), 0.0)
            ones = (r[None, :] // POOL == sub[:, None]) & valid[None, :]
            if POOL_F32:
                sums = tl.dot(ones.to(tl.float32), x, input_precision=PRECISION)
            else:
                sums = tl.dot(ones.to(x_in.dtype), x_in, out_dtype=tl.float32)
            qs += sums * inv[:, None]
        else:
            # the block test broadcast to a vector: a vector & scalar-bool mask is rejected by Triton 3.9's interpreter
            tl.store(mean_out_ptr + (bh * NB + blk).to(tl.int64) * D + d, mean, mask=(d < D) & (d * 0 + blk < NB))
    if WITH_MAP:
        row_blk = pid * QPB + row // NSUB
        row_count = tl.minimum(tl.maximum(S - (row_blk * BLOCK + (row % NSUB) * POOL), 0), POOL).to(tl.float32)
        blk_count = tl.maximum(tl.minimum(S - row_blk * BLOCK, BLOCK), 1).to(tl.float32)
        weight = row_count / blk_count  # 0 for sub-queries past the end of the sequence
        kmean_base = kmean_ptr + bh.to(tl.int64) * KB * D
        m = tl.full((M,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((M,), dtype=tl.float32)
        for c in range(0, KB, BK):
            kb = c + tl.arange(0, BK)
            kvalid = kb < KB
            s = _key_chunk_scores(qs, kmean_base, kb, kvalid, d, S, scale_log2, BLOCK, D, LOG_BIAS, SCORE_PREC)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m = m_new
        coef = weight / l
        out_blk = pid * QPB + tl.arange(0, QPB)
        probs_base = probs_ptr + bh.to(tl.int64) * NB * KB
        for c in range(0, KB, BK):
            kb = c + tl.arange(0, BK)
            kvalid = kb < KB
            s = _key_chunk_scores(qs, kmean_base, kb, kvalid, d, S, scale_log2, BLOCK, D, LOG_BIAS, SCORE_PREC)
            p = tl.exp2(s - m[:, None]) * coef[:, None]
            out = tl.sum(tl.reshape(p, (QPB, NSUB, BK)), axis=1)
            ptrs = probs_base + out_blk.to(tl.int64)[:, None] * KB + kb[None, :]
            tl.store(ptrs, out, mask=(out_blk[:, None] < NB) & kvalid[None, :])


def _is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_draft_map_inputs(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor | None, query_pool: int,
                           block: int) -> None:
    """Raise ``ValueError``/``TypeError`` naming the bad value and the allowed values."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError(f"q and k must be tensors, got {type(q).__name__} and {type(k).__name__}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, H, S, D) of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype not in DRAFT_MAP_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k dtype must be one of {DRAFT_MAP_DTYPES} and equal, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if q.shape[2] < 1:
        raise ValueError(f"sequence length must be >= 1, got {q.shape[2]}")
    if block != KERNEL_BLOCK:
        raise ValueError(f"block must be {KERNEL_BLOCK}, got {block!r}")
    if isinstance(query_pool, bool) or not isinstance(query_pool, int) or query_pool < 1 or block % query_pool:
        raise ValueError(f"query_pool must be a divisor of {block} (1, 2, 4, ..., {block}), got {query_pool!r}")
    if perm is not None:
        B, H, S, _ = q.shape
        if perm.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"perm dtype must be torch.int32 or torch.int64, got {perm.dtype}")
        if perm.device != q.device:
            raise ValueError(f"perm must be on q's device {q.device}, got {perm.device}")
        if tuple(perm.shape) not in ((S,), (B, H, S)):
            raise ValueError(f"perm shape must be ({S},) or ({B}, {H}, {S}), got {tuple(perm.shape)}")


def draft_map_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    perm: torch.Tensor | None = None,
    query_pool: int = 4,
    scale: float,
    log_block_size: bool = True,
    block: int = KERNEL_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft map of ``(B, H, S, D)`` q and k (model order) with blocks formed in the order ``perm``.

    Args:
        q, k: ``(B, H, S, D)`` float16/bfloat16/float32, D in :data:`DRAFT_MAP_HEAD_DIMS`, last stride 1
            (diffusers' ``(B, S, H, D).transpose(1, 2)`` needs no copy).
        perm: planned order, ``(S,)`` or ``(B, H, S)`` int32/int64 (token ``i`` of the order is row
            ``perm[..., i]``), or ``None`` (the model's order). Not checked to be a permutation.
        query_pool: query tokens per sub-query, a divisor of ``block`` (``block``: one pooled query per block).
        scale: factor of the pooled logits (the attention scale divided by the draft temperature).
        log_block_size: add ``log(tokens in the key block)`` to the logits.
        block: token block, 128.
    Returns:
        ``(probs (B, H, QB, KB), q_similarity (B, H, QB), k_similarity (B, H, KB))``, float32, as
        :class:`dit_accel.attention.draft.DraftMap`: per query block the estimated share of its attention
        per key block, and each block's mean cosine similarity of its sampled tokens to its mean.
    """
    check_draft_map_inputs(q, k, perm, query_pool, block)
    B, H, S, D = q.shape
    if D not in DRAFT_MAP_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {DRAFT_MAP_HEAD_DIMS} for the kernel, got {D}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if not (q.is_cuda or _is_interpreting()):
        raise ValueError(f"the Triton draft map needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    nb = -(-S // block)
    dev = q.device
    k_means = torch.empty(B, H, nb, D, device=dev, dtype=torch.float32)
    k_sim = torch.empty(B, H, nb, device=dev, dtype=torch.float32)
    q_sim = torch.empty(B, H, nb, device=dev, dtype=torch.float32)
    probs = torch.empty(B, H, nb, nb, device=dev, dtype=torch.float32)
    if perm is None:
        idx, sib, sih = q, 0, 0  # unused pointer
    else:
        idx = perm if perm.stride(-1) == 1 else perm.contiguous()
        sib, sih = (0, 0) if idx.dim() == 1 else (idx.stride(0), idx.stride(1))
    precision = "ieee" if _is_interpreting() else "tf32x3"
    score_precision = "ieee" if _is_interpreting() else SCORE_PRECISION
    # 16-bit inputs pool by a native MMA, except in the interpreter (its bf16 dot is wrong, /work/shared/cpu.md)
    pool_f32 = q.dtype == torch.float32 or _is_interpreting()
    launch = MAP_LAUNCH
    div = 1 if D == 128 else 2  # head dim 64: half the warps
    common = dict(BLOCK=block, D=D, STRIDE=SIMILARITY_STRIDE, KB=nb, BK=launch.key_chunk,
                  HAS_INDEX=perm is not None,
                  LOG_BIAS=bool(log_block_size), PRECISION=precision, SCORE_PREC=score_precision,
                  POOL_F32=pool_f32, num_stages=launch.stages)
    _block_stats_and_map_kernel[(nb, B * H)](
        k, idx, k_means, k_means, k_sim, probs, S, H, nb, k.stride(0), k.stride(1), k.stride(2), sib, sih, 1.0,
        POOL=block, QPB=1, WITH_MAP=False, num_warps=max(1, launch.key_warps // div), **common)
    nsub = block // query_pool
    # query blocks per program: map_rows sub-query rows, no more blocks than there are, >= 16 rows for tl.dot
    qpb = max(min(max(1, launch.map_rows // nsub), triton.next_power_of_2(nb)), 16 // nsub, 1)
    _block_stats_and_map_kernel[(triton.cdiv(nb, qpb), B * H)](
        q, idx, k_means, k_means, q_sim, probs, S, H, nb, q.stride(0), q.stride(1), q.stride(2), sib, sih,
        float(scale) * math.log2(math.e), POOL=query_pool, QPB=qpb, WITH_MAP=True,
        num_warps=max(1, launch.map_warps // div), **common)
    return probs, q_sim, k_sim


@triton.jit
def _select_blocks_kernel(
    probs_ptr, qsim_ptr, ksim_ptr, text_ptr, keep_ptr, protect_ptr, kv_num_ptr, kv_idx_ptr,
    QB, KB, top_p, min_blocks, sim_threshold,
    KB_P2: tl.constexpr, HAS_TEXT: tl.constexpr, KEEP_ALL: tl.constexpr, INDICES: tl.constexpr,
):
    """One program: one row (query block) of the map. Top-p selection by bisection on the float32 bit pattern
    of the threshold (exact: the largest ``t`` whose entries ``>= t`` hold ``top_p`` of the row's mass and are
    at least ``min_blocks``), plus the protected tiles; with ``INDICES`` also the row's BlockMask entries."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh.to(tl.int64) * QB + qb
    kb = tl.arange(0, KB_P2)
    valid = kb < KB
    p = tl.load(probs_ptr + row * KB + kb, mask=valid, other=0.0)
    if KEEP_ALL:
        sel = valid
    else:
        # probabilities are >= 0, so their bit patterns order as int32; padding gets -1 (never selected)
        bits = tl.where(valid, p.to(tl.int32, bitcast=True), -1)
        target = top_p * tl.sum(p, axis=0)
        hi = tl.max(bits, axis=0) + 1  # t past the largest entry selects nothing: fails
        lo = hi * 0  # t = 0.0 selects every entry: holds (min_blocks <= KB, checked by the caller)
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            sel = bits >= mid
            mass = tl.sum(tl.where(sel, p, 0.0), axis=0)
            count = tl.sum(sel.to(tl.int32), axis=0)
            ok = (mass >= target) & (count >= min_blocks)
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        sel = bits >= lo
    ksim = tl.load(ksim_ptr + bh.to(tl.int64) * KB + kb, mask=valid, other=1.0)
    qsim = tl.load(qsim_ptr + row)
    # as int32 flags (the interpreter cannot OR a scalar bool into a bool vector)
    protect = (kb == qb).to(tl.int32) + (ksim < sim_threshold).to(tl.int32) + (qsim < sim_threshold).to(tl.int32)
    if HAS_TEXT:
        protect += tl.load(text_ptr + kb, mask=valid, other=0).to(tl.int32) + tl.load(text_ptr + qb).to(tl.int32)
    protect = protect > 0
    keep = sel | protect
    tl.store(keep_ptr + row * KB + kb, keep.to(tl.int8), mask=valid)
    tl.store(protect_ptr + row * KB + kb, protect.to(tl.int8), mask=valid)
    if INDICES:
        # The row of kv_indices exactly as block_mask_from_bool compacts it (so the BlockMask is bit-identical
        # and its compaction pass, 0.23-0.26 ms at Wan-1.3B 480p on an H200, leaves the plan): the kept columns
        # ascending, then the others ascending as padding. With ``before`` the kept columns up to and including
        # column j, a kept j goes to ``before - 1``, another one to ``count + j - before``: a permutation of
        # the row, so every entry is written once. Padding lanes (j >= KB) count as not kept and are not stored.
        kept = (keep & valid).to(tl.int32)
        before = tl.cumsum(kept, axis=0)
        count = tl.sum(kept, axis=0)
        pos = tl.where(kept > 0, before - 1, count + kb - before)
        tl.store(kv_idx_ptr + row * KB + pos, kb, mask=valid)
        tl.store(kv_num_ptr + row, count)


class BlockSelection(NamedTuple):
    """What :func:`select_blocks_triton` writes for a ``(B, H, QB, KB)`` draft map."""

    keep: torch.Tensor
    """``(B, H, QB, KB)`` bool: the selection, protected tiles included."""
    protect: torch.Tensor
    """``(B, H, QB, KB)`` bool: the protected tiles."""
    kv_num_blocks: torch.Tensor | None
    """``(B, H, QB)`` int32: kept key blocks per row, the BlockMask field (``None`` unless ``indices``)."""
    kv_indices: torch.Tensor | None
    """``(B, H, QB, KB)`` int32: per row the kept key blocks ascending, then the others ascending as padding,
    the BlockMask field exactly as :func:`dit_accel.kernels.block_mask_from_bool` builds it from ``keep``
    (``None`` unless ``indices``)."""


def select_blocks_triton(
    probs: torch.Tensor,
    q_similarity: torch.Tensor,
    k_similarity: torch.Tensor,
    *,
    top_p: float,
    min_blocks: int,
    similarity_threshold: float,
    text_blocks: torch.Tensor | None = None,
    indices: bool = False,
) -> BlockSelection:
    """Top-p selection plus protected tiles of a draft map, in one pass over it (no sort).

    Same selection as :func:`dit_accel.attention.draft.top_p_keep` (``probs`` ``(B, H, QB, KB)``, the fewest
    highest entries of each row holding ``top_p`` of its mass, at least ``min_blocks``) except where entries
    tie at the threshold (the reference keeps ``n`` of them in sort order, this keeps all) or the row's mass
    lands within float32 rounding of the ``top_p`` boundary (the two sum in different orders). Protected:
    the diagonal, rows with ``q_similarity`` and columns with ``k_similarity`` below ``similarity_threshold``,
    rows and columns of ``text_blocks`` ``(KB,)`` bool.

    With ``indices`` the kernel also writes the BlockMask rows of ``keep`` (``kv_num_blocks``, ``kv_indices``;
    bit-identical to :func:`dit_accel.kernels.block_mask_from_bool` of ``keep``, the torch reference), so a
    plan needs no compaction pass (:func:`dit_accel.kernels.block_mask_from_indices` wraps them).

    Returns:
        :class:`BlockSelection`; ``keep`` includes ``protect``.
    """
    if probs.dim() != 4 or probs.dtype != torch.float32:
        raise ValueError(f"probs must be a (B, H, QB, KB) float32 tensor, got {probs.dtype} {tuple(probs.shape)}")
    B, H, QB, KB = probs.shape
    if QB != KB:
        raise ValueError(f"probs must be square per head (self-attention blocks), got {QB} x {KB}")
    if tuple(q_similarity.shape) != (B, H, QB) or tuple(k_similarity.shape) != (B, H, KB):
        raise ValueError(f"similarities must be ({B}, {H}, {QB}) and ({B}, {H}, {KB}), got "
                         f"{tuple(q_similarity.shape)} and {tuple(k_similarity.shape)}")
    if text_blocks is not None and tuple(text_blocks.shape) != (KB,):
        raise ValueError(f"text_blocks must be ({KB},) bool, got {tuple(text_blocks.shape)}")
    if not (0.0 < top_p):
        raise ValueError(f"top_p must be > 0, got {top_p!r}")
    if not (probs.is_cuda or _is_interpreting()):
        raise ValueError(f"the Triton selection needs CUDA tensors (or TRITON_INTERPRET=1), got device {probs.device}")
    min_blocks = max(1, int(min_blocks))
    keep_all = top_p >= 1.0 or min_blocks >= KB
    probs, q_similarity, k_similarity = (t.contiguous().float() for t in (probs, q_similarity, k_similarity))
    keep = torch.empty(B, H, QB, KB, device=probs.device, dtype=torch.int8)
    protect = torch.empty_like(keep)
    text = keep if text_blocks is None else text_blocks.to(torch.int8).contiguous()
    kb_p2 = triton.next_power_of_2(KB)  # the row's lanes
    if indices:
        kv_num = torch.empty(B, H, QB, device=probs.device, dtype=torch.int32)
        kv_idx = torch.empty(B, H, QB, KB, device=probs.device, dtype=torch.int32)
    else:
        kv_num = kv_idx = None
    _select_blocks_kernel[(QB, B * H)](
        probs, q_similarity, k_similarity, text, keep, protect,
        keep if kv_num is None else kv_num, keep if kv_idx is None else kv_idx,  # unused pointers without indices
        QB, KB, float(top_p), min_blocks, float(similarity_threshold), KB_P2=kb_p2,
        HAS_TEXT=text_blocks is not None, KEEP_ALL=keep_all, INDICES=indices,
        num_warps=min(8, MAP_LAUNCH.select_warps * max(1, kb_p2 // 256)))
    return BlockSelection(keep.view(torch.bool), protect.view(torch.bool), kv_num, kv_idx)
