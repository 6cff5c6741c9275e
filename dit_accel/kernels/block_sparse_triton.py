"""Block-sparse attention forward in Triton (FlashAttention-2 style, non-causal).

One program per (query block, batch x head). It walks the key blocks listed for its query block in a
FlexAttention ``BlockMask`` (``kv_indices``, then ``full_kv_indices``), keeps the running max ``m`` and
denominator ``l`` in base 2 (``log2(e)`` is folded into the scale so the kernel uses ``exp2``), and
accumulates ``P @ V`` in float32. Layout, LSE and tile statistics: see
:mod:`dit_accel.kernels.block_sparse_common`.

Ragged tails cost no masked loads: row indices past the end are clamped to the last row (so every load
is in bounds and reads this head's own data), the clamped key columns get ``-inf`` logits in the one
tile that reaches past the end, and output rows past the end are not stored.

Token permutations are folded into the addressing: with ``q_index`` the program's query rows are
loaded from (and its output and LSE rows stored to) ``q_index[row]``; with ``kv_index`` each key/value
sub-tile loads ``kv_index[col]`` first and then those rows (each row stays D contiguous elements, so the
loads stay coalesced; TMA, which copies contiguous boxes, is not used then). Clamping happens in the
permuted order, before the lookup, so everything above holds unchanged.

Tile statistics are a by-product: the row maxima of each tile are already computed for the online
softmax; their maximum over the tile's rows is stored per tile, and in the epilogue, once the final LSE
is known, the program subtracts the smallest LSE of its rows from its own tiles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_sparse_common import BlockSparseOutput, MaskView

__all__ = ["block_sparse_attention_triton", "indexed_num_stages", "kernel_config", "INTERPRETED"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when this module was imported with ``TRITON_INTERPRET=1`` (kernels run in the Triton interpreter)."""

_LN2 = 0.6931471805599453
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_listed_blocks(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, k_row0, k_col0, v_row0, v_col0,
    idx_row, n_listed, ts_row, S_KV, qk_scale,
    offs_d, kvidx_base,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    EVEN_KV: tl.constexpr, TILE_STATS: tl.constexpr, USE_TMA: tl.constexpr, HAS_KVIDX: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over the first ``n_listed`` key blocks of ``idx_row``."""
    SUB: tl.constexpr = KV_BLOCK // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    tile_max = tl.full((), float("-inf"), tl.float32)
    for it in range(0, n_listed * SUB):
        if SUB == 1:
            kb = tl.load(idx_row + it)
            start_n = kb * KV_BLOCK
        else:
            kb = tl.load(idx_row + it // SUB)
            start_n = kb * KV_BLOCK + (it % SUB) * BLOCK_N
        cols = start_n + offs_n
        if USE_TMA:
            # Rows past S_KV come from the next head (or are zero-filled past the tensor's end): their
            # logits are set to -inf below and their V rows are multiplied by exact zeros.
            k = desc_k.load([k_row0 + start_n, k_col0])
        else:
            if EVEN_KV:
                rows_kv = cols
            else:
                rows_kv = tl.minimum(cols, S_KV - 1)
            if HAS_KVIDX:
                # Permuted key position -> original row (the mask lists blocks of the permuted order).
                rows_kv = tl.load(kvidx_base + rows_kv)
            k_ptrs = k_base + rows_kv[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = v_base + rows_kv[:, None] * stride_vn + offs_d[None, :]
            if HEAD_DIM == HEAD_DIM_PAD:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        qk = tl.dot(q, tl.trans(k))
        if not EVEN_KV:
            if start_n + BLOCK_N > S_KV:
                qk = tl.where(cols[None, :] < S_KV, qk, float("-inf"))
        row_max = tl.max(qk, 1)
        m_new = tl.maximum(m_i, row_max * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = desc_v.load([v_row0 + start_n, v_col0])
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        if TILE_STATS:
            # Raw max logit of the tile (log2 units); the epilogue subtracts the block's smallest LSE.
            # (One reduction over rows then a scalar store is cheaper than a per-row atomic max, which
            # needs a layout conversion to drop replicated rows.)
            t = tl.max(row_max, 0) * qk_scale
            if SUB == 1:
                tl.store(ts_row + kb, t)
            else:
                tile_max = tl.where(it % SUB == 0, t, tl.maximum(tile_max, t))
                tl.store(ts_row + kb, tile_max, mask=(it % SUB) == SUB - 1)
    return acc, l_i, m_i


@triton.jit
def _finish_tile_stats(idx_row, n_listed, ts_row, lse_min, CHUNK: tl.constexpr):
    """Turn the stored raw tile maxima of one row of the mask into ``(max - min LSE)`` in natural log."""
    for start in range(0, n_listed, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ok = offs < n_listed
        kbs = tl.load(idx_row + offs, mask=ok, other=0)
        raw = tl.load(ts_row + kbs, mask=ok, other=0.0)
        tl.store(ts_row + kbs, (raw - lse_min) * 0.6931471805599453, mask=ok)


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, LSE, TS, desc_k, desc_v,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, QIDX, KVIDX, HIDX,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_fnb, stride_fnh, stride_fnq,
    stride_fib, stride_fih, stride_fiq,
    stride_tb, stride_th, stride_tq,
    stride_qib, stride_qih, stride_kib, stride_kih,
    H, S_Q, S_KV, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, EVEN_KV: tl.constexpr,
    RETURN_LSE: tl.constexpr, TILE_STATS: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_QIDX: tl.constexpr, HAS_KVIDX: tl.constexpr, HAS_HIDX: tl.constexpr,
):
    qb = tl.program_id(0)
    if HAS_HIDX:
        # The grid covers the listed heads only; every address below derives from (b, h) as without it.
        bh = tl.load(HIDX + tl.program_id(1))
    else:
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows_q = tl.minimum(offs_m, S_Q - 1)
    if HAS_QIDX:
        # Permuted query position -> original row; out and LSE go back to the same rows.
        rows_q = tl.load(QIDX + b.to(tl.int64) * stride_qib + h.to(tl.int64) * stride_qih + rows_q)
        rows_o = rows_q
    else:
        rows_o = offs_m
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + rows_q[:, None] * stride_qm + offs_d[None, :]
    if HEAD_DIM == HEAD_DIM_PAD:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)

    k_off = b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_off = b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k_base = K + k_off
    v_base = V + v_off
    # TMA views k and v as 2-D [rows, stride_kn]: this head's first row and column in that view.
    k_row0 = (k_off // stride_kn).to(tl.int32)
    k_col0 = (k_off % stride_kn).to(tl.int32)
    v_row0 = (v_off // stride_vn).to(tl.int32)
    v_col0 = (v_off % stride_vn).to(tl.int32)
    kvidx_base = KVIDX + b.to(tl.int64) * stride_kib + h.to(tl.int64) * stride_kih
    ts_row = TS + b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + qb * stride_tq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    n_part = tl.load(KV_NUM + b * stride_nb + h * stride_nh + qb * stride_nq)
    idx_part = KV_IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb * stride_iq
    acc, l_i, m_i = _attend_listed_blocks(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, k_row0, k_col0, v_row0, v_col0,
        idx_part, n_part, ts_row, S_KV, qk_scale, offs_d, kvidx_base,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, KV_BLOCK, EVEN_KV, TILE_STATS, USE_TMA, HAS_KVIDX,
    )
    if HAS_FULL:
        n_full = tl.load(FULL_NUM + b * stride_fnb + h * stride_fnh + qb * stride_fnq)
        idx_full = FULL_IDX + b.to(tl.int64) * stride_fib + h.to(tl.int64) * stride_fih + qb * stride_fiq
        acc, l_i, m_i = _attend_listed_blocks(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, desc_k, desc_v, k_row0, k_col0, v_row0, v_col0,
            idx_full, n_full, ts_row, S_KV, qk_scale, offs_d, kvidx_base,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, KV_BLOCK, EVEN_KV, TILE_STATS, USE_TMA, HAS_KVIDX,
        )

    # Empty query block: l_i == 0 -> output 0, LSE -inf (never 0/0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows_o[:, None] * stride_om + offs_d[None, :]
    o_mask = offs_m[:, None] < S_Q
    if HEAD_DIM != HEAD_DIM_PAD:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)

    if RETURN_LSE or TILE_STATS:
        lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        if RETURN_LSE:
            tl.store(LSE + bh.to(tl.int64) * S_Q + rows_o, lse2 * 0.6931471805599453, mask=offs_m < S_Q)
        if TILE_STATS:
            # Rows past S_Q duplicate row S_Q - 1 (clamped loads), so the minimum is over real rows.
            lse_min = tl.min(lse2, 0)
            # The tile maxima were stored by other threads of this program: make them visible first.
            tl.debug_barrier()
            _finish_tile_stats(idx_part, n_part, ts_row, lse_min, 128)
            if HAS_FULL:
                _finish_tile_stats(idx_full, n_full, ts_row, lse_min, 128)


# (HEAD_DIM_PAD, element size) -> (BLOCK_N, num_warps, num_stages, use TMA), for a 128-row query block.
# The fastest variants of the sweep in benchmarks/attention_kernel.py (--sweep) on Hopper.
_CONFIGS: dict[tuple[int, int], tuple[int, int, int, bool]] = {
    (64, 2): (64, 4, 3, False),
    (128, 2): (128, 8, 3, True),
    (64, 4): (64, 8, 2, False),
    (128, 4): (32, 8, 2, False),
}


TMA_MIN_KV_LEN = 24576
"""Below this many keys the pointer path is used even where the config says TMA: on Hopper TMA is 4-10 %
faster at 32,760 and 75,600 tokens but 4-35 % slower at 4,096 and 16,384."""


def kernel_config(
    head_dim_pad: int, elem_size: int, q_block: int, kv_block: int, kv_len: int = TMA_MIN_KV_LEN
) -> tuple[int, int, int, bool]:
    """(BLOCK_N, num_warps, num_stages, use_tma) for a head dim (padded), element size, mask block sizes
    and key length."""
    block_n, warps, stages, tma = _CONFIGS[(head_dim_pad, elem_size)]
    tma = tma and kv_len >= TMA_MIN_KV_LEN
    block_n = min(block_n, kv_block)
    if q_block == 64:
        warps = 4
    return block_n, warps, stages, tma


def indexed_num_stages(num_stages: int) -> int:
    """Pipeline depth to ask for when K/V rows are loaded through ``kv_index``.

    Triton's pipeliner gives loads a latency of ``(num_stages - 1) // (indirection levels + 1)``; the
    index load in front of the K/V loads is one level, so the same K/V buffering as ``num_stages``
    without an index needs ``2 * (num_stages - 1) + 1``. (Checked offline for sm_90: D=128 bf16 with 3
    stages keeps 2 K/V buffers, 164 KB shared; with 5 it gets 3, 230 KB, like the unindexed kernel.)
    """
    return 2 * (num_stages - 1) + 1


def _tma_view(t: Tensor, block_rows: int, block_cols: int):
    """A 2-D TMA descriptor over ``t`` (B, H, S, D) seen as ``[rows, stride(2)]``, or None if the layout does
    not fit (each head's rows must start at a whole row of that view, or at a column offset that keeps
    its D columns inside the row)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, H, S, D = t.shape
    sb, sh, sn, _ = t.stride()
    elem = t.element_size()
    if sn <= 0 or (sn * elem) % 16 != 0 or t.data_ptr() % 16 != 0 or sb % sn != 0:
        return None
    if sh % sn != 0 and not (sh >= D and sh * (H - 1) + D <= sn):
        return None
    max_off = (B - 1) * sb + (H - 1) * sh + (S - 1) * sn + D
    rows = (max_off + sn - 1) // sn
    return TensorDescriptor(t, [rows, sn], [sn, 1], [block_rows, block_cols])


def block_sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    view: MaskView,
    *,
    return_lse: bool = False,
    tile_stats: bool = False,
    config: tuple[int, int, int] | None = None,
    use_tma: bool | None = None,
    q_index: Tensor | None = None,
    kv_index: Tensor | None = None,
    head_index: Tensor | None = None,
) -> Tensor | BlockSparseOutput:
    """Launch the Triton kernel on checked inputs (``view`` from ``check_inputs``, indices from
    ``check_index``: int32, unit last stride, ``(S,)`` or ``(B|1, H|1, S)``; ``head_index`` from
    ``check_head_index``: only those heads are computed).

    ``config`` overrides ``(BLOCK_N, num_warps, num_stages)`` and ``use_tma`` the load path (benchmark
    sweeps); leave them None.
    """
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    d_pad = 64 if D == 64 else 128
    block_n, num_warps, num_stages, tma = kernel_config(d_pad, q.element_size(), view.q_block, view.kv_block, S_kv)
    if kv_index is not None:
        num_stages = indexed_num_stages(num_stages)
    if config is not None:
        block_n, num_warps, num_stages = config
    if use_tma is not None:
        tma = use_tma
    if kv_index is not None:
        tma = False  # TMA copies contiguous row ranges; gathered rows go through the pointer path
    if view.kv_block % block_n != 0:
        raise ValueError(f"BLOCK_N {block_n} must divide the mask's key block size {view.kv_block}")

    out = torch.empty((B, H, S_q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S_q), dtype=torch.float32, device=q.device) if return_lse else out
    if tile_stats:
        ts = torch.full((B, H, view.num_q_blocks, view.num_kv_blocks), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        ts = out  # never touched: TILE_STATS is off
    has_full = view.full_kv_num_blocks is not None
    kv_num = view.kv_num_blocks
    kv_idx = view.kv_indices if view.kv_indices.stride(-1) == 1 else view.kv_indices.contiguous()
    f_num = view.full_kv_num_blocks if has_full else kv_num
    f_idx = view.full_kv_indices if has_full else kv_idx
    if f_idx.stride(-1) != 1:
        f_idx = f_idx.contiguous()

    def bstride(t: Tensor, dim: int) -> int:
        # Broadcast a mask of batch/head size 1 over q's batch/heads.
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    desc_k = desc_v = None
    # Hopper's tensor-memory accelerator loads K and V when the layout allows it (see ``_tma_view``).
    if tma and q.is_cuda and not INTERPRETED and q.element_size() == 2:
        if torch.cuda.get_device_capability(q.device)[0] >= 9:
            desc_k = _tma_view(k, block_n, d_pad)
            desc_v = _tma_view(v, block_n, d_pad)
            if desc_k is None or desc_v is None:
                desc_k = desc_v = None

    def index_strides(index: Tensor | None) -> tuple[int, int]:
        if index is None or index.dim() == 1:
            return 0, 0
        return bstride(index, 0), bstride(index, 1)

    q_ib, q_ih = index_strides(q_index)
    k_ib, k_ih = index_strides(kv_index)

    grid = (view.num_q_blocks, B * H if head_index is None else head_index.numel())
    _block_sparse_fwd[grid](
        q, k, v, out, lse, ts, desc_k, desc_v,
        kv_num, kv_idx, f_num, f_idx,
        q_index if q_index is not None else kv_num, kv_index if kv_index is not None else kv_num,
        head_index if head_index is not None else kv_num,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        bstride(kv_num, 0), bstride(kv_num, 1), kv_num.stride(2),
        bstride(kv_idx, 0), bstride(kv_idx, 1), kv_idx.stride(2),
        bstride(f_num, 0), bstride(f_num, 1), f_num.stride(2),
        bstride(f_idx, 0), bstride(f_idx, 1), f_idx.stride(2),
        ts.stride(0) if tile_stats else 0, ts.stride(1) if tile_stats else 0, ts.stride(2) if tile_stats else 0,
        q_ib, q_ih, k_ib, k_ih,
        H, S_q, S_kv, view.scale * _LOG2E,
        HEAD_DIM=D, HEAD_DIM_PAD=d_pad,
        BLOCK_M=view.q_block, BLOCK_N=block_n, KV_BLOCK=view.kv_block,
        HAS_FULL=has_full, EVEN_KV=(S_kv % view.kv_block == 0),
        RETURN_LSE=return_lse, TILE_STATS=tile_stats,
        USE_TMA=desc_k is not None,
        HAS_QIDX=q_index is not None, HAS_KVIDX=kv_index is not None, HAS_HIDX=head_index is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not (return_lse or tile_stats):
        return out
    return BlockSparseOutput(out, lse if return_lse else None, ts if tile_stats else None)
