"""Torch reference of the 8-bit block-sparse attention path: the same quantisation and arithmetic as the
Triton kernels (:mod:`.fp8_quantize_triton`, :mod:`.block_sparse_fp8_triton`), for CPU tests.

The arithmetic is described in :mod:`.fp8_common`. The attention part materialises the full
``(B, H, S_q, S_kv)`` logits in float32: small shapes only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse_common import BlockSparseOutput, MaskView, check_index, check_inputs
from .reference_common import block_allowed, gather_rows, scatter_rows
from .fp8_common import FP8_MAX, INT8_MAX, P_SHIFT, QuantizedQKV, QuantRecipe, check_recipe, padded_head_dim

__all__ = [
    "attention_quantized_reference",
    "block_sparse_attention_fp8_reference",
    "quantize_qkv_reference",
    "round_fp8",
    "round_int8",
    "scale_and_inverse",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def round_fp8(x: Tensor) -> Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448 (what Hopper's cvt.rn.satfinite does)."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def round_int8(x: Tensor) -> Tensor:
    """float32 -> int8, round half away from zero, clamped to [-127, 127] (the kernel adds +-0.5 and truncates)."""
    return torch.trunc(x + torch.where(x < 0, -0.5, 0.5)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def scale_and_inverse(amax: Tensor, qmax: float) -> tuple[Tensor, Tensor]:
    """Dequantisation scale ``amax / qmax`` and quantisation factor ``qmax / amax`` (both 1 where amax is 0)."""
    nonzero = amax > 0
    safe = torch.where(nonzero, amax, torch.ones_like(amax))
    # Tensor / tensor: correctly rounded, as the kernels' div_rn (torch turns a division by or of a Python
    # scalar into a multiplication by a reciprocal, which rounds differently).
    qm = torch.full_like(amax, qmax)
    scale = torch.where(nonzero, safe / qm, torch.ones_like(amax))
    inv = torch.where(nonzero, qm / safe, torch.ones_like(amax))
    return scale, inv


def _pad_rows(x: Tensor, padded: int) -> Tensor:
    """``x`` (B, H, S, D) with rows past S repeating row S-1, to ``padded`` rows."""
    S = x.shape[2]
    idx = torch.arange(padded, device=x.device).clamp(max=S - 1)
    return x.index_select(2, idx)


def _pad_cols(x: Tensor, d_pad: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, d_pad - x.shape[-1])) if x.shape[-1] < d_pad else x


def _blockwise(x: Tensor, block: int, qmax: float, fmt: str) -> tuple[Tensor, Tensor]:
    """Quantise float32 ``x`` (B, H, n*block, D) with one scale per block of rows."""
    B, H, S, D = x.shape
    xb = x.view(B, H, S // block, block, D)
    scale, inv = scale_and_inverse(xb.abs().amax(dim=(-1, -2)), qmax)
    y = xb * inv[..., None, None]
    q = round_fp8(y) if fmt == "fp8" else round_int8(y)
    return q.view(B, H, S, D), scale


def quantize_qkv_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    view: MaskView,
    recipe: QuantRecipe,
    *,
    q_index: Tensor | None = None,
    kv_index: Tensor | None = None,
    row_bias: bool = False,
    k_mean: Tensor | None = None,
    v_absmax: Tensor | None = None,
) -> QuantizedQKV:
    """The quantisation pass in torch (see :mod:`.fp8_common`), same layout as the Triton pass.

    Args:
        q, k, v: checked inputs ``(B, H, S, D)``.
        view: the checked mask (block sizes, block counts, softmax scale).
        recipe: the 8-bit formats.
        q_index, kv_index: checked token permutations (or None).
        row_bias: also compute the per-row LSE correction (needed for LSE and tile statistics).
        k_mean, v_absmax: ``(B, H, D_pad)`` float32 statistics to use instead of computing them (tests feed
            the Triton pass's own, so that both quantise from the same numbers).
    """
    recipe = check_recipe(recipe)
    B, H, S_q, D = q.shape
    S_kv = k.shape[2]
    d_pad = padded_head_dim(D)
    qmax = FP8_MAX if recipe.qk == "fp8" else INT8_MAX
    if k_mean is None:
        k_mean = _pad_cols(k.float().mean(dim=2), d_pad)
    if v_absmax is None:
        v_absmax = _pad_cols(v.float().abs().amax(dim=2), d_pad)

    qf = _pad_cols(_pad_rows(gather_rows(q, q_index), view.num_q_blocks * view.q_block).float(), d_pad)
    kf = _pad_cols(_pad_rows(gather_rows(k, kv_index), view.num_kv_blocks * view.kv_block).float(), d_pad)
    vp = _pad_cols(_pad_rows(gather_rows(v, kv_index), view.num_kv_blocks * view.kv_block), d_pad)

    q8, q_scale = _blockwise(qf, view.q_block, qmax, recipe.qk)
    k8, k_scale = _blockwise(kf - k_mean[:, :, None, :], view.kv_block, qmax, recipe.qk)
    if recipe.pv == "fp8":
        v_scale, v_inv = scale_and_inverse(v_absmax, FP8_MAX)
        v_out = round_fp8(vp.float() * v_inv[:, :, None, :]).transpose(-1, -2).contiguous()
    else:
        v_scale = torch.ones_like(v_absmax)
        v_out = (vp if vp.element_size() == 2 else vp.to(torch.bfloat16)).contiguous()
    bias = None
    if row_bias:
        bias = (qf * k_mean[:, :, None, :]).sum(-1) * (view.scale * _LOG2E)
    return QuantizedQKV(q8, k8, v_out, q_scale, k_scale, v_scale, k_mean, bias, recipe, S_q, S_kv, D)


def attention_quantized_reference(
    qq: QuantizedQKV,
    view: MaskView,
    *,
    out_dtype: torch.dtype,
    return_lse: bool = False,
    tile_stats: bool = False,
    q_index: Tensor | None = None,
) -> Tensor | BlockSparseOutput:
    """Block-sparse attention on quantised inputs (float32 math), the kernel's arithmetic; output, LSE and
    tile statistics as :func:`~dit_accel.kernels.block_sparse_attention` returns them."""
    if (return_lse or tile_stats) and qq.row_bias is None:
        raise ValueError("LSE and tile statistics need the row bias: quantise with row_bias=True")
    B, H, S_qp, d_pad = qq.q.shape
    S_kvp = qq.k.shape[2]
    S_q, S_kv = qq.seq_q, qq.seq_kv
    allowed = block_allowed(view, B, H)
    tok = allowed.repeat_interleave(view.q_block, dim=2).repeat_interleave(view.kv_block, dim=3)
    tok = tok & (torch.arange(S_kvp, device=tok.device) < S_kv)

    raw = torch.matmul(qq.q.float(), qq.k.float().transpose(-1, -2))
    s_q = (qq.q_scale * (view.scale * _LOG2E)).repeat_interleave(view.q_block, dim=2)
    s_k = qq.k_scale.repeat_interleave(view.kv_block, dim=2)
    # One scalar per tile, formed as the kernel forms it: (s_q * scale * log2 e) * s_k.
    x = (raw * (s_q[..., :, None] * s_k[..., None, :])).masked_fill(~tok, float("-inf"))
    m = torch.ceil(x.amax(dim=-1))
    empty = torch.isneginf(m)
    m_safe = torch.where(empty, torch.zeros_like(m), m)
    p = torch.exp2(x - (m_safe - P_SHIFT)[..., None])
    l = p.sum(dim=-1)
    if qq.recipe.pv == "fp8":
        o = torch.matmul(round_fp8(p).float(), qq.v.float().transpose(-1, -2)) * qq.v_scale[:, :, None, :]
    else:
        o = torch.matmul(p.to(qq.v.dtype).float(), qq.v.float())
    l_safe = torch.where(empty, torch.ones_like(l), l)
    o = torch.where(empty[..., None], torch.zeros_like(o), o / l_safe[..., None])
    out = scatter_rows(o[:, :, :S_q, : qq.head_dim].to(out_dtype), q_index)
    if not (return_lse or tile_stats):
        return out

    lse2 = torch.where(empty, torch.full_like(l, float("-inf")), m_safe - P_SHIFT + torch.log2(l_safe) + qq.row_bias)
    lse = None
    if return_lse:
        lse = scatter_rows((lse2[:, :, :S_q] * _LN2).unsqueeze(-1), q_index).squeeze(-1)
    stats = None
    if tile_stats:
        true_x = x + qq.row_bias[..., None]
        n_qb, n_kb = view.num_q_blocks, view.num_kv_blocks
        tile_max = true_x.view(B, H, n_qb, view.q_block, n_kb, view.kv_block).amax(dim=(3, 5))
        # Padded rows repeat the last real row, so the minimum over a block's rows is over real rows.
        lse_min = lse2.view(B, H, n_qb, view.q_block).amin(dim=-1)
        stats = torch.where(allowed, (tile_max - lse_min[..., None]) * _LN2, torch.full_like(tile_max, float("-inf")))
    return BlockSparseOutput(out, lse, stats)


def block_sparse_attention_fp8_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockMask,
    *,
    recipe: QuantRecipe,
    scale: float | None = None,
    return_lse: bool = False,
    tile_stats: bool = False,
    q_index: Tensor | None = None,
    kv_index: Tensor | None = None,
) -> Tensor | BlockSparseOutput:
    """The 8-bit path in torch: :func:`quantize_qkv_reference` then :func:`attention_quantized_reference`.
    Arguments and results as :func:`~dit_accel.kernels.block_sparse_attention`, plus the ``recipe``."""
    view = check_inputs(q, k, v, mask, scale)
    B, H, S_q, _ = q.shape
    q_index = check_index("q_index", q_index, B, H, S_q, q.device)
    kv_index = check_index("kv_index", kv_index, B, H, k.shape[2], q.device)
    qq = quantize_qkv_reference(q, k, v, view, recipe, q_index=q_index, kv_index=kv_index,
                                row_bias=return_lse or tile_stats)
    return attention_quantized_reference(qq, view, out_dtype=q.dtype, return_lse=return_lse, tile_stats=tile_stats,
                                         q_index=q_index)

