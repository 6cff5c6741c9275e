"""The quantisation pass of the 8-bit attention path in Triton: q, k, v -> :class:`~.fp8_common.QuantizedQKV`.

Two kernels (the arithmetic is in :mod:`.fp8_common`):

1. ``_kv_stats``: one read of k and v, per chunk of tokens the column sums of k and the column maxima of
   ``|v|``. The K mean and the V channel scales are global over the tokens, so they must be known before
   any block is quantised; the few partial rows are finished by two small torch reductions.
2. ``_quantize_qkv``: one read of q, k, v. A program takes one query block and one key block of one
   (batch, head), gathers their rows through the token permutations (``q_index`` / ``kv_index``), and
   writes them contiguous, in the mask's order, padded to whole blocks (padding rows repeat the last
   token, as the bf16 kernel's clamped loads do), with the block scales, V transposed for the fp8 P @ V,
   and the per-row LSE correction ``scale * log2(e) * q . mean(k)``.

With the permutation applied here, the attention kernel reads k and v contiguously (TMA on Hopper)
whatever the token order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .block_sparse_common import MaskView
from .fp8_common import QuantizedQKV, QuantRecipe, check_recipe, padded_head_dim

__all__ = ["STATS_CHUNK", "quantize_qkv_triton", "round_e4m3_soft", "to_8bit"]

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""True when this module was imported with ``TRITON_INTERPRET=1``."""

_LOG2E = 1.4426950408889634
_STATS_ROWS = 64
_STATS_STEPS = 16
STATS_CHUNK = _STATS_ROWS * _STATS_STEPS
"""Tokens per program of the statistics pass."""


@triton.jit
def round_e4m3_soft(x):
    """``x`` (float32, ``|x| <= 448``) rounded to the nearest e4m3 value, ties to even, in float32 arithmetic.

    Used under the interpreter only: its own float32 -> float8 cast does not carry a rounding into the
    exponent (31.8 becomes 16). On the GPU the hardware conversion (cvt.rn.satfinite) does this.
    """
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    # Normal range: keep 3 of the 23 mantissa bits, round to nearest even (a carry moves into the exponent).
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range (|x| < 2^-6): a fixed step of 2^-9, rounded by the float32 addition itself.
    sub = (ax + 16384.0) - 16384.0
    r = tl.where(ax < 0.015625, sub, normal)
    return tl.where(x < 0, -r, r)


@triton.jit
def to_8bit(x, TO_INT8: tl.constexpr, SOFT_FP8: tl.constexpr):
    """float32 -> int8 (round half away from zero, [-127, 127]) or float8 e4m3 (nearest even, saturated)."""
    if TO_INT8:
        x = tl.minimum(tl.maximum(x, -127.0), 127.0)
        return (x + tl.where(x < 0, -0.5, 0.5)).to(tl.int8)
    else:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if SOFT_FP8:
            x = round_e4m3_soft(x)
        return x.to(tl.float8e4nv)


@triton.jit
def _scale_inv(amax, QMAX: tl.constexpr):
    """(amax / QMAX, QMAX / amax), both 1 where amax is 0; correctly rounded divisions (as torch's)."""
    nonzero = amax > 0
    safe = tl.where(nonzero, amax, 1.0)
    scale = tl.where(nonzero, tl.math.div_rn(safe, QMAX), 1.0)
    inv = tl.where(nonzero, tl.math.div_rn(QMAX, safe), 1.0)
    return scale, inv


@triton.jit
def _kv_stats(
    K, V, KSUM, VMAX,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    H, S_KV, N_CHUNKS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROWS: tl.constexpr, STEPS: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    offs_r = tl.arange(0, ROWS)
    dmask = offs_d < HEAD_DIM
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    ksum = tl.zeros([D_PAD], dtype=tl.float32)
    vmax = tl.zeros([D_PAD], dtype=tl.float32)
    for i in range(STEPS):
        rows = (c * STEPS + i) * ROWS + offs_r
        m = (rows < S_KV)[:, None] & dmask[None, :]
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_d[None, :], mask=m, other=0.0).to(tl.float32)
        ksum += tl.sum(k, 0)
        vmax = tl.maximum(vmax, tl.max(tl.abs(v), 0))
    out = (bh.to(tl.int64) * N_CHUNKS + c) * D_PAD + offs_d
    tl.store(KSUM + out, ksum)
    tl.store(VMAX + out, vmax)


@triton.jit
def _quantize_qkv(
    Q, K, V, QIDX, KVIDX, KMEAN, VMAX,
    Q8, K8, V8, QS, KS, VS, RB,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_qib, stride_qih, stride_kib, stride_kih,
    H, S_Q, S_KV, N_QB, N_KB, S_Q_PAD, S_KV_PAD, rb_scale,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    QK_INT8: tl.constexpr, V_FP8: tl.constexpr, HAS_QIDX: tl.constexpr, HAS_KVIDX: tl.constexpr,
    ROW_BIAS: tl.constexpr, SOFT_FP8: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    bh64 = bh.to(tl.int64)
    QMAX: tl.constexpr = 127.0 if QK_INT8 else 448.0
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    kmean = tl.load(KMEAN + bh64 * D_PAD + offs_d)

    if blk < N_QB:
        rows = blk * Q_BLOCK + tl.arange(0, Q_BLOCK)
        src = tl.minimum(rows, S_Q - 1)  # padding rows repeat the last token
        if HAS_QIDX:
            src = tl.load(QIDX + b * stride_qib + h * stride_qih + src)
        x = tl.load(Q + b * stride_qb + h * stride_qh + src[:, None] * stride_qm + offs_d[None, :],
                    mask=dmask[None, :], other=0.0).to(tl.float32)
        scale, inv = _scale_inv(tl.max(tl.max(tl.abs(x), 1), 0), QMAX)
        tl.store(Q8 + (bh64 * S_Q_PAD + rows[:, None]) * D_PAD + offs_d[None, :], to_8bit(x * inv, QK_INT8, SOFT_FP8))
        tl.store(QS + bh64 * N_QB + blk, scale)
        if ROW_BIAS:
            tl.store(RB + bh64 * S_Q_PAD + rows, tl.sum(x * kmean[None, :], 1) * rb_scale)

    if blk < N_KB:
        rows = blk * KV_BLOCK + tl.arange(0, KV_BLOCK)
        src = tl.minimum(rows, S_KV - 1)
        if HAS_KVIDX:
            src = tl.load(KVIDX + b * stride_kib + h * stride_kih + src)
        x = tl.load(K + b * stride_kb + h * stride_kh + src[:, None] * stride_kn + offs_d[None, :],
                    mask=dmask[None, :], other=0.0).to(tl.float32) - kmean[None, :]
        scale, inv = _scale_inv(tl.max(tl.max(tl.abs(x), 1), 0), QMAX)
        tl.store(K8 + (bh64 * S_KV_PAD + rows[:, None]) * D_PAD + offs_d[None, :], to_8bit(x * inv, QK_INT8, SOFT_FP8))
        tl.store(KS + bh64 * N_KB + blk, scale)
        v = tl.load(V + b * stride_vb + h * stride_vh + src[:, None] * stride_vn + offs_d[None, :],
                    mask=dmask[None, :], other=0.0)
        if V_FP8:
            v_scale, v_inv = _scale_inv(tl.load(VMAX + bh64 * D_PAD + offs_d), 448.0)
            v8 = to_8bit(v.to(tl.float32) * v_inv[None, :], False, SOFT_FP8)
            # Transposed (D, S): the token axis is the reduction axis of P @ V and fp8 wgmma wants it contiguous.
            tl.store(V8 + (bh64 * D_PAD + offs_d[None, :]) * S_KV_PAD + rows[:, None], v8)
            if blk == 0:
                tl.store(VS + bh64 * D_PAD + offs_d, v_scale)
        else:
            tl.store(V8 + (bh64 * S_KV_PAD + rows[:, None]) * D_PAD + offs_d[None, :], v.to(V8.dtype.element_ty))


def _index_strides(index: Tensor | None) -> tuple[int, int]:
    if index is None or index.dim() == 1:
        return 0, 0
    return (0 if index.shape[0] == 1 else index.stride(0)), (0 if index.shape[1] == 1 else index.stride(1))


def quantize_qkv_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    view: MaskView,
    recipe: QuantRecipe,
    *,
    q_index: Tensor | None = None,
    kv_index: Tensor | None = None,
    row_bias: bool = False,
) -> QuantizedQKV:
    """Quantise checked q, k, v (``check_inputs`` / ``check_index``) for the 8-bit attention kernel.

    ``row_bias`` also computes the per-row LSE correction (needed when LSE or tile statistics are asked for).
    """
    recipe = check_recipe(recipe)
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    d_pad = padded_head_dim(D)
    dev = q.device
    n_qb, n_kb = view.num_q_blocks, view.num_kv_blocks
    s_q_pad, s_kv_pad = n_qb * view.q_block, n_kb * view.kv_block

    n_chunks = triton.cdiv(S_kv, STATS_CHUNK)
    ksum = torch.empty((B, H, n_chunks, d_pad), dtype=torch.float32, device=dev)
    vmax = torch.empty((B, H, n_chunks, d_pad), dtype=torch.float32, device=dev)
    _kv_stats[(n_chunks, B * H)](
        k, v, ksum, vmax, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        H, S_kv, n_chunks, HEAD_DIM=D, D_PAD=d_pad, ROWS=_STATS_ROWS, STEPS=_STATS_STEPS, num_warps=4,
    )
    k_mean = ksum.sum(dim=2).mul_(1.0 / S_kv)
    v_absmax = vmax.amax(dim=2)

    qk_dtype = torch.int8 if recipe.qk == "int8" else torch.float8_e4m3fn
    q8 = torch.empty((B, H, s_q_pad, d_pad), dtype=qk_dtype, device=dev)
    k8 = torch.empty((B, H, s_kv_pad, d_pad), dtype=qk_dtype, device=dev)
    if recipe.pv == "fp8":
        v8 = torch.empty((B, H, d_pad, s_kv_pad), dtype=torch.float8_e4m3fn, device=dev)
        v_scale = torch.empty((B, H, d_pad), dtype=torch.float32, device=dev)
    else:
        v8 = torch.empty((B, H, s_kv_pad, d_pad), dtype=v.dtype if v.element_size() == 2 else torch.bfloat16,
                         device=dev)
        v_scale = torch.ones((B, H, d_pad), dtype=torch.float32, device=dev)
    q_scale = torch.empty((B, H, n_qb), dtype=torch.float32, device=dev)
    k_scale = torch.empty((B, H, n_kb), dtype=torch.float32, device=dev)
    bias = torch.empty((B, H, s_q_pad), dtype=torch.float32, device=dev) if row_bias else None
    q_ib, q_ih = _index_strides(q_index)
    k_ib, k_ih = _index_strides(kv_index)
    dummy = q_scale
    _quantize_qkv[(max(n_qb, n_kb), B * H)](
        q, k, v, q_index if q_index is not None else dummy, kv_index if kv_index is not None else dummy,
        k_mean, v_absmax, q8, k8, v8, q_scale, k_scale, v_scale, bias if bias is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), q_ib, q_ih, k_ib, k_ih,
        H, S_q, S_kv, n_qb, n_kb, s_q_pad, s_kv_pad, view.scale * _LOG2E,
        HEAD_DIM=D, D_PAD=d_pad, Q_BLOCK=view.q_block, KV_BLOCK=view.kv_block,
        QK_INT8=recipe.qk == "int8", V_FP8=recipe.pv == "fp8", HAS_QIDX=q_index is not None,
        HAS_KVIDX=kv_index is not None, ROW_BIAS=row_bias, SOFT_FP8=INTERPRETED, num_warps=8,
    )
    return QuantizedQKV(q8, k8, v8, q_scale, k_scale, v_scale, k_mean, bias, recipe, S_q, S_kv, D)

