"""Block-sparse attention forward on 8-bit inputs in Triton (Hopper/Ada FP8 tensor cores).

Same program structure, mask walk, LSE and tile statistics as the bf16 kernel
(:mod:`.block_sparse_triton`); what differs (arithmetic in :mod:`.fp8_common`):

- inputs come from the quantisation pass (:mod:`.fp8_quantize_triton`): already in the mask's token order,
  padded to whole blocks and contiguous, so K and V tiles are plain TMA boxes (no clamping, no index
  lookups; ``q_index`` is only needed to store the output rows back in q's order);
- ``Q @ K^T`` is an fp8 (or int8) dot; the tile's logits are the raw dot times one scalar
  ``s_q * s_k * scale * log2(e)``, folded into the FMA in front of ``exp2`` that the bf16 kernel has too;
- the running row maximum is an integer (``ceil``), P is ``exp2(x - m + P_SHIFT)``, so the fp8 rounding
  of P is that of a two-pass softmax (see :mod:`.fp8_common`) and the rescale factors are exact;
- ``P @ V`` reads V transposed, ``(D, S)``: Hopper's fp8 wgmma needs its B operand K-major, and for
  ``P @ V`` K is the token axis. The per-channel V scale and ``1 / l`` are applied once, in the epilogue;
- LSE and tile statistics add back the per-row smoothing term ``c = scale * log2(e) * q . mean(k)``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_sparse_common import BlockSparseOutput, MaskView
from .fp8_common import P_SHIFT, QuantizedQKV, QuantRecipe
from .fp8_quantize_triton import quantize_qkv_triton, round_e4m3_soft

__all__ = ["Launch8bit", "attention_quantized_triton", "block_sparse_attention_fp8_triton", "kernel_config_8bit"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when this module was imported with ``TRITON_INTERPRET=1``."""

_LOG2E = 1.4426950408889634
_P_SHIFT = tl.constexpr(P_SHIFT)


@triton.jit
def _p_to_fp8(p, SOFT_FP8: tl.constexpr):
    """P (in (0, 2^P_SHIFT], far below 448) to e4m3: a plain conversion on the GPU (round to nearest even)."""
    if SOFT_FP8:
        p = round_e4m3_soft(p)
    return p.to(tl.float8e4nv)


@triton.jit
def _attend_listed_blocks_8bit(
    acc, l_i, m_i, q, q_scale, c2,
    k_base, v_base, desc_k, desc_v, kv_row0, v_row0, ks_base,
    idx_row, n_listed, ts_row, S_KV, S_KV_PAD, offs_d,
    D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    EVEN_KV: tl.constexpr, TILE_STATS: tl.constexpr, USE_TMA: tl.constexpr,
    QK_INT8: tl.constexpr, V_FP8: tl.constexpr, PV_PRECISE: tl.constexpr, SOFT_FP8: tl.constexpr,
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
        # Dequantisation of the whole tile: one scalar (softmax scale and log2(e) included).
        s = q_scale * tl.load(ks_base + kb)
        if USE_TMA:
            k = desc_k.load([kv_row0 + start_n, 0])
        else:
            k = tl.load(k_base + (start_n + offs_n)[:, None] * D_PAD + offs_d[None, :])
        if QK_INT8:
            qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
        else:
            qk = tl.dot(q, tl.trans(k))
        if not EVEN_KV:
            if start_n + BLOCK_N > S_KV:
                # Padding keys (they repeat the last token) get no weight.
                qk = tl.where((start_n + offs_n)[None, :] < S_KV, qk, float("-inf"))
        row_max = tl.max(qk, 1) * s
        # An integer running maximum: P's fp8 rounding does not depend on the tile order, rescales are exact.
        m_new = tl.maximum(m_i, tl.math.ceil(row_max))
        p = tl.math.exp2(qk * s - (m_new - _P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if V_FP8:
            if USE_TMA:
                vt = desc_v.load([v_row0, start_n])
            else:
                vt = tl.load(v_base + offs_d[:, None] * S_KV_PAD + (start_n + offs_n)[None, :])
            p8 = _p_to_fp8(p, SOFT_FP8)
            if PV_PRECISE:
                # Hopper's fp8 MMA accumulates with a reduced-precision adder; this adds each tile's
                # product to acc in full fp32 instead (one extra add per accumulator element).
                acc = tl.dot(p8, tl.trans(vt), acc, max_num_imprecise_acc=BLOCK_N)
            else:
                acc = tl.dot(p8, tl.trans(vt), acc)
        else:
            if USE_TMA:
                v = desc_v.load([kv_row0 + start_n, 0])
            else:
                v = tl.load(v_base + (start_n + offs_n)[:, None] * D_PAD + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        if TILE_STATS:
            # Largest unsmoothed logit of the tile (log2 units); the epilogue subtracts the block's min LSE.
            t = tl.max(row_max + c2, 0)
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
def _block_sparse_fwd_8bit(
    Q8, K8, V8, QS, KS, VS, RB, O, LSE, TS, desc_k, desc_v,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, QIDX, HIDX,
    stride_ob, stride_oh, stride_om,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq,
    stride_fnb, stride_fnh, stride_fnq,
    stride_fib, stride_fih, stride_fiq,
    stride_tb, stride_th, stride_tq,
    stride_qib, stride_qih,
    H, S_Q, S_KV, N_QB, N_KB, S_Q_PAD, S_KV_PAD, qk_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    Q_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_FULL: tl.constexpr, EVEN_KV: tl.constexpr,
    RETURN_LSE: tl.constexpr, TILE_STATS: tl.constexpr, USE_TMA: tl.constexpr, HAS_QIDX: tl.constexpr,
    QK_INT8: tl.constexpr, V_FP8: tl.constexpr, PV_PRECISE: tl.constexpr, SOFT_FP8: tl.constexpr,
    HAS_HIDX: tl.constexpr,
):
    # A program takes BLOCK_M rows of a Q_BLOCK-row query block of the mask (BLOCK_M < Q_BLOCK: several
    # smaller programs walk the same mask row; tile statistics need the whole block in one program).
    pid_m = tl.program_id(0)
    qb = pid_m // (Q_BLOCK // BLOCK_M)
    if HAS_HIDX:
        # The grid covers the listed heads only; every address below derives from bh as without it.
        bh = tl.load(HIDX + tl.program_id(1))
    else:
        bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q8 + (bh64 * S_Q_PAD + offs_m[:, None]) * D_PAD + offs_d[None, :])
    q_scale = tl.load(QS + bh64 * N_QB + qb) * qk_scale
    if RETURN_LSE or TILE_STATS:
        c2 = tl.load(RB + bh64 * S_Q_PAD + offs_m)
    else:
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_base = K8 + bh64 * S_KV_PAD * D_PAD
    v_base = V8 + bh64 * S_KV_PAD * D_PAD  # (D, S) or (S, D): the same number of elements per head
    kv_row0 = bh * S_KV_PAD  # first row of this head in the 2-D TMA views (the host checks int32 range)
    v_row0 = bh * D_PAD
    ks_base = KS + bh64 * N_KB
    ts_row = TS + b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + qb * stride_tq

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    n_part = tl.load(KV_NUM + b * stride_nb + h * stride_nh + qb * stride_nq)
    idx_part = KV_IDX + b.to(tl.int64) * stride_ib + h.to(tl.int64) * stride_ih + qb * stride_iq
    acc, l_i, m_i = _attend_listed_blocks_8bit(
        acc, l_i, m_i, q, q_scale, c2, k_base, v_base, desc_k, desc_v, kv_row0, v_row0, ks_base,
        idx_part, n_part, ts_row, S_KV, S_KV_PAD, offs_d,
        D_PAD, BLOCK_N, KV_BLOCK, EVEN_KV, TILE_STATS, USE_TMA, QK_INT8, V_FP8, PV_PRECISE, SOFT_FP8,
    )
    if HAS_FULL:
        n_full = tl.load(FULL_NUM + b * stride_fnb + h * stride_fnh + qb * stride_fnq)
        idx_full = FULL_IDX + b.to(tl.int64) * stride_fib + h.to(tl.int64) * stride_fih + qb * stride_fiq
        acc, l_i, m_i = _attend_listed_blocks_8bit(
            acc, l_i, m_i, q, q_scale, c2, k_base, v_base, desc_k, desc_v, kv_row0, v_row0, ks_base,
            idx_full, n_full, ts_row, S_KV, S_KV_PAD, offs_d,
            D_PAD, BLOCK_N, KV_BLOCK, EVEN_KV, TILE_STATS, USE_TMA, QK_INT8, V_FP8, PV_PRECISE, SOFT_FP8,
        )

    # Empty query block: l_i == 0 -> output 0, LSE -inf (never 0/0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if V_FP8:
        out = acc * tl.load(VS + bh64 * D_PAD + offs_d)[None, :] * (1.0 / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    if HAS_QIDX:
        # Permuted query position -> original row: out and LSE are stored in q's own order.
        rows_o = tl.load(QIDX + b.to(tl.int64) * stride_qib + h.to(tl.int64) * stride_qih
                         + tl.minimum(offs_m, S_Q - 1))
    else:
        rows_o = offs_m
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + rows_o[:, None] * stride_om + offs_d[None, :]
    o_mask = offs_m[:, None] < S_Q
    if HEAD_DIM != D_PAD:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)

    if RETURN_LSE or TILE_STATS:
        lse2 = tl.where(empty, float("-inf"), m_i - _P_SHIFT + tl.math.log2(l_safe) + c2)
        if RETURN_LSE:
            tl.store(LSE + bh64 * S_Q + rows_o, lse2 * 0.6931471805599453, mask=offs_m < S_Q)
        if TILE_STATS:
            # Padding rows repeat the last query, so the minimum is over real rows.
            lse_min = tl.min(lse2, 0)
            # The tile maxima were stored by other threads of this program: make them visible first.
            tl.debug_barrier()
            _finish_tile_stats(idx_part, n_part, ts_row, lse_min, 128)
            if HAS_FULL:
                _finish_tile_stats(idx_full, n_full, ts_row, lse_min, 128)


class Launch8bit(NamedTuple):
    """Launch parameters of the 8-bit kernel."""

    block_m: int
    """Query rows per program (divides the mask's query block; smaller programs fit two per SM, whose
    softmax and matrix products then overlap)."""
    block_n: int
    """Keys per tile (divides the mask's key block)."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining depth of the K/V loads."""
    use_tma: bool
    """Load K/V tiles with Hopper's tensor-memory accelerator (else pointer loads)."""


# D_pad -> launch for a 128-row query block.
_LAUNCH_8BIT: dict[int, Launch8bit] = {
    64: Launch8bit(128, 128, 8, 3, True),
    128: Launch8bit(128, 128, 8, 3, True),
}


def kernel_config_8bit(d_pad: int, q_block: int, kv_block: int, tile_stats: bool = False) -> Launch8bit:
    """Launch parameters of the 8-bit kernel for a padded head dim, the mask's block sizes and whether tile
    statistics are asked for (they need one program per query block)."""
    cfg = _LAUNCH_8BIT[d_pad]
    block_m = q_block if tile_stats else min(cfg.block_m, q_block)
    # Two warpgroups for 128 rows (one would hold two 128-wide fp32 tiles per thread and spill), one for 64.
    warps = cfg.num_warps if block_m == cfg.block_m else (8 if block_m == 128 else 4)
    return cfg._replace(block_m=block_m, block_n=min(cfg.block_n, kv_block), num_warps=warps)


def attention_quantized_triton(
    qq: QuantizedQKV,
    view: MaskView,
    *,
    out_dtype: torch.dtype,
    return_lse: bool = False,
    tile_stats: bool = False,
    q_index: Tensor | None = None,
    launch: Launch8bit | None = None,
    pv_precise: bool = False,
    head_index: Tensor | None = None,
) -> Tensor | BlockSparseOutput:
    """Launch the 8-bit attention kernel on the output of the quantisation pass (``head_index``: only those
    flat heads are computed, see ``block_sparse_attention``).

    ``launch`` overrides the launch parameters and ``pv_precise`` the fp8 ``P @ V`` accumulation
    (full-precision adds per tile): benchmark sweeps; leave the defaults.
    """
    if (return_lse or tile_stats) and qq.row_bias is None:
        raise ValueError("LSE and tile statistics need the row bias: quantise with row_bias=True")
    B, H, s_q_pad, d_pad = qq.q.shape
    s_kv_pad = qq.k.shape[2]
    S_q, S_kv = qq.seq_q, qq.seq_kv
    dev = qq.q.device
    if launch is None:
        launch = kernel_config_8bit(d_pad, view.q_block, view.kv_block, tile_stats)
    block_m, block_n, num_warps, num_stages, tma = launch
    if view.kv_block % block_n != 0:
        raise ValueError(f"BLOCK_N {block_n} must divide the mask's key block size {view.kv_block}")
    if view.q_block % block_m != 0 or (tile_stats and block_m != view.q_block):
        raise ValueError(f"BLOCK_M {block_m} must divide the mask's query block size {view.q_block} "
                         f"(and equal it for tile statistics)")
    if B * H * max(s_kv_pad, d_pad) >= 2**31:
        raise ValueError(f"B*H*S_kv = {B}*{H}*{s_kv_pad} is too large for the kernel's int32 row coordinates")

    out = torch.empty((B, H, S_q, qq.head_dim), dtype=out_dtype, device=dev)
    lse = torch.empty((B, H, S_q), dtype=torch.float32, device=dev) if return_lse else out
    if tile_stats:
        ts = torch.full((B, H, view.num_q_blocks, view.num_kv_blocks), float("-inf"), dtype=torch.float32, device=dev)
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
        # Broadcast a mask (or index) of batch/head size 1 over the batch/heads.
        return 0 if t.shape[dim] == 1 else t.stride(dim)

    v_fp8 = qq.recipe.pv == "fp8"
    desc_k = desc_v = None
    if tma and dev.type == "cuda" and not INTERPRETED and torch.cuda.get_device_capability(dev)[0] >= 9:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_k = TensorDescriptor(qq.k, [B * H * s_kv_pad, d_pad], [d_pad, 1], [block_n, d_pad])
        if v_fp8:
            desc_v = TensorDescriptor(qq.v, [B * H * d_pad, s_kv_pad], [s_kv_pad, 1], [d_pad, block_n])
        else:
            desc_v = TensorDescriptor(qq.v, [B * H * s_kv_pad, d_pad], [d_pad, 1], [block_n, d_pad])

    if q_index is None or q_index.dim() == 1:
        q_ib = q_ih = 0
    else:
        q_ib, q_ih = bstride(q_index, 0), bstride(q_index, 1)
    bias = qq.row_bias if qq.row_bias is not None else qq.q_scale

    grid = (view.num_q_blocks * (view.q_block // block_m), B * H if head_index is None else head_index.numel())
    _block_sparse_fwd_8bit[grid](
        qq.q, qq.k, qq.v, qq.q_scale, qq.k_scale, qq.v_scale, bias, out, lse, ts, desc_k, desc_v,
        kv_num, kv_idx, f_num, f_idx, q_index if q_index is not None else kv_num,
        head_index if head_index is not None else kv_num,
        out.stride(0), out.stride(1), out.stride(2),
        bstride(kv_num, 0), bstride(kv_num, 1), kv_num.stride(2),
        bstride(kv_idx, 0), bstride(kv_idx, 1), kv_idx.stride(2),
        bstride(f_num, 0), bstride(f_num, 1), f_num.stride(2),
        bstride(f_idx, 0), bstride(f_idx, 1), f_idx.stride(2),
        ts.stride(0) if tile_stats else 0, ts.stride(1) if tile_stats else 0, ts.stride(2) if tile_stats else 0,
        q_ib, q_ih,
        H, S_q, S_kv, view.num_q_blocks, view.num_kv_blocks, s_q_pad, s_kv_pad, view.scale * _LOG2E,
        HEAD_DIM=qq.head_dim, D_PAD=d_pad,
        Q_BLOCK=view.q_block, BLOCK_M=block_m, BLOCK_N=block_n, KV_BLOCK=view.kv_block,
        HAS_FULL=has_full, EVEN_KV=(S_kv % view.kv_block == 0),
        RETURN_LSE=return_lse, TILE_STATS=tile_stats, USE_TMA=desc_k is not None,
        HAS_QIDX=q_index is not None, QK_INT8=qq.recipe.qk == "int8", V_FP8=v_fp8,
        PV_PRECISE=pv_precise and v_fp8, SOFT_FP8=INTERPRETED, HAS_HIDX=head_index is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not (return_lse or tile_stats):
        return out
    return BlockSparseOutput(out, lse if return_lse else None, ts if tile_stats else None)


def block_sparse_attention_fp8_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    view: MaskView,
    *,
    recipe: QuantRecipe,
    return_lse: bool = False,
    tile_stats: bool = False,
    q_index: Tensor | None = None,
    kv_index: Tensor | None = None,
    launch: Launch8bit | None = None,
    pv_precise: bool = False,
    head_index: Tensor | None = None,
) -> Tensor | BlockSparseOutput:
    """Quantise (:func:`~.fp8_quantize_triton.quantize_qkv_triton`) and attend
    (:func:`attention_quantized_triton`): checked inputs as for the bf16 kernel's launcher. With ``head_index``
    the quantisation pass still covers every head (it is a small share of the call) and the attention kernel
    only the listed ones."""
    qq = quantize_qkv_triton(q, k, v, view, recipe, q_index=q_index, kv_index=kv_index,
                             row_bias=return_lse or tile_stats)
    return attention_quantized_triton(qq, view, out_dtype=q.dtype, return_lse=return_lse, tile_stats=tile_stats,
                                      q_index=q_index, launch=launch, pv_precise=pv_precise, head_index=head_index)
