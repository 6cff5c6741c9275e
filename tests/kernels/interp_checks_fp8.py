"""Runs the 8-bit path's Triton kernels in the Triton interpreter on tiny CPU inputs and prints, as one JSON
object, how they compare with the torch reference of the same arithmetic. Started by
test_block_sparse_fp8.py in a subprocess with TRITON_INTERPRET=1.

What the interpreter can check, and what it cannot:
- the quantisation pass: permutation gathers, padding, block and channel scales, K smoothing, the row bias,
  the 8-bit codes (compared byte for byte with the reference, given the same K mean and V maxima);
- the attention kernel's indexing, mask walk, integer running max, P rounding, dequantisation, LSE, tile
  statistics and the output scatter, on the *same* quantised tensors as the reference (fp8 and int8 dots
  are exact in the interpreter, so only float32 rounding separates the two);
- not: the GPU's own fp8 conversion (the interpreter's float8 cast mis-rounds, so the kernels round in
  software under it, ``SOFT_FP8``), the TMA load path, wgmma accumulation precision, bf16 dots (wrong in
  the interpreter: the 16-bit P @ V variant is checked with float16 inputs here). Those are checked on the
  GPU by benchmarks/attention_kernel_fp8.py.
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1")

import interp_patch  # noqa: E402,F401  (numpy >= 2.4: loop bounds read from memory)
import torch  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask  # noqa: E402

from dit_accel.kernels import block_mask_from_bool, block_sparse_attention, block_sparse_attention_reference  # noqa: E402
from dit_accel.kernels.block_sparse_common import check_index, check_inputs  # noqa: E402
from dit_accel.kernels.block_sparse_fp8_triton import Launch8bit, attention_quantized_triton  # noqa: E402
from dit_accel.kernels.fp8_common import QuantRecipe, fp8_supported  # noqa: E402
from dit_accel.kernels.fp8_quantize_triton import quantize_qkv_triton  # noqa: E402
from dit_accel.kernels.fp8_reference import attention_quantized_reference, quantize_qkv_reference  # noqa: E402

FP8 = QuantRecipe("fp8", "fp8")
FP8_QK = QuantRecipe("fp8", "16bit")
INT8 = QuantRecipe("int8", "fp8")
INT8_QK = QuantRecipe("int8", "16bit")


def _fin(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _qkv(B, H, S_q, S_kv, D, dtype, layout="bhsd", k_bias=0.0):
    def mk(S):
        if layout == "bshd":
            return torch.randn(B, S, H, D, dtype=torch.float32).transpose(1, 2)
        return torch.randn(B, H, S, D, dtype=torch.float32)

    q, k, v = mk(S_q), mk(S_kv), mk(S_kv)
    # A per-channel offset on the keys, as DiT keys have: smoothing must take it out.
    k = k + k_bias * torch.randn(1, 1, 1, D)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _perm(S: int, *lead: int) -> torch.Tensor:
    if not lead:
        return torch.randperm(S).to(torch.int32)
    return torch.argsort(torch.rand(*lead, S), dim=-1).to(torch.int32)


def quant_case(q, k, v, mask, recipe, qi=None, ki=None) -> dict:
    """Triton quantisation pass vs the reference fed the Triton pass's own K mean and V maxima."""
    view = check_inputs(q, k, v, mask, None)
    B, H, S_q, _ = q.shape
    qi = check_index("q_index", qi, B, H, S_q, q.device)
    ki = check_index("kv_index", ki, B, H, k.shape[2], q.device)
    got = quantize_qkv_triton(q, k, v, view, recipe, q_index=qi, kv_index=ki, row_bias=True)
    # The K mean is a float32 sum in another order: the reference gets the Triton pass's own, so that the
    # 8-bit codes can be compared byte for byte (V maxima are order-free and computed by each side).
    ref_stats = quantize_qkv_reference(q, k, v, view, recipe, q_index=qi, kv_index=ki, row_bias=True)
    ref = quantize_qkv_reference(q, k, v, view, recipe, q_index=qi, kv_index=ki, row_bias=True, k_mean=got.k_mean)
    return dict(
        k_mean_err=float((got.k_mean - ref_stats.k_mean).abs().max()),
        v_scale_equal=bool(torch.equal(got.v_scale, ref_stats.v_scale)),
        q_equal=_bytes_equal(got.q, ref.q),
        k_equal=_bytes_equal(got.k, ref.k),
        v_equal=_bytes_equal(got.v, ref.v),
        q_scale_equal=bool(torch.equal(got.q_scale, ref.q_scale)),
        k_scale_equal=bool(torch.equal(got.k_scale, ref.k_scale)),
        row_bias_err=float((got.row_bias - ref.row_bias).abs().max() / ref.row_bias.abs().max().clamp_min(1e-30)),
        shapes_ok=all(tuple(a.shape) == tuple(b.shape) for a, b in zip(got[:7], ref[:7])),
    )


def heads_case(q, k, v, mask, recipe, heads) -> dict:
    """The 8-bit kernel on a head subset vs the reference on every head (same quantised tensors), compared on
    the listed heads."""
    view = check_inputs(q, k, v, mask, None)
    B, H = q.shape[:2]
    index = torch.tensor(heads, dtype=torch.int32)
    qq = quantize_qkv_triton(q, k, v, view, recipe, row_bias=True)
    got = attention_quantized_triton(qq, view, out_dtype=q.dtype, return_lse=True, tile_stats=True, head_index=index)
    ref = attention_quantized_reference(qq, view, out_dtype=q.dtype, return_lse=True, tile_stats=True)
    listed = torch.zeros(B * H, dtype=torch.bool)
    listed[index.long()] = True
    listed = listed.view(B, H)
    return dict(
        rel_err=_rel(got.out[listed], ref.out[listed]),
        nan=bool(torch.isnan(got.out[listed]).any()),
        lse_err=float((_fin(got.lse[listed]) - _fin(ref.lse[listed])).abs().max()),
        lse_inf_match=bool(torch.equal(torch.isinf(got.lse[listed]), torch.isinf(ref.lse[listed]))),
        ts_err=float((_fin(got.tile_stats[listed]) - _fin(ref.tile_stats[listed])).abs().max()),
        others_ts_neg_inf=bool(torch.isneginf(got.tile_stats[~listed]).all()),
    )


def attn_case(q, k, v, mask, recipe, qi=None, ki=None, launch=None, tile_stats=True) -> dict:
    """Triton attention kernel vs the reference attention, both on the same (Triton) quantised tensors; plus
    the kernel against float32 attention."""
    view = check_inputs(q, k, v, mask, None)
    B, H, S_q, _ = q.shape
    qi = check_index("q_index", qi, B, H, S_q, q.device)
    ki = check_index("kv_index", ki, B, H, k.shape[2], q.device)
    qq = quantize_qkv_triton(q, k, v, view, recipe, q_index=qi, kv_index=ki, row_bias=True)
    got = attention_quantized_triton(qq, view, out_dtype=q.dtype, return_lse=True, tile_stats=tile_stats,
                                     q_index=qi, launch=launch)
    ref = attention_quantized_reference(qq, view, out_dtype=q.dtype, return_lse=True, tile_stats=tile_stats,
                                        q_index=qi)
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask, return_lse=True, q_index=qi,
                                             kv_index=ki)
    r = dict(
        rel_err=_rel(got.out, ref.out),
        nan=bool(torch.isnan(got.out).any() or torch.isnan(got.lse).any()),
        lse_err=float((_fin(got.lse) - _fin(ref.lse)).abs().max()),
        lse_inf_match=bool(torch.equal(torch.isinf(got.lse), torch.isinf(ref.lse))),
        rel_err_vs_fp32=_rel(got.out, exact.out),
        lse_err_vs_fp32=float((_fin(got.lse) - _fin(exact.lse)).abs().max()),
    )
    if tile_stats:
        r.update(
            nan_ts=bool(torch.isnan(got.tile_stats).any()),
            ts_err=float((_fin(got.tile_stats) - _fin(ref.tile_stats)).abs().max()),
            ts_inf_match=bool(torch.equal(torch.isinf(got.tile_stats), torch.isinf(ref.tile_stats))),
        )
    return r


def main() -> None:
    torch.manual_seed(0)
    res: dict = {}

    # --- quantisation pass
    q, k, v = _qkv(1, 2, 300, 300, 64, torch.float16, k_bias=3.0)
    bb = torch.rand(1, 2, 5, 5) < 0.5
    m64 = block_mask_from_bool(bb, 300, 300, 64)
    res["quant_fp8_ragged_b64"] = quant_case(q, k, v, m64, FP8)
    res["quant_int8_16bit_perm_per_head"] = quant_case(q, k, v, m64, INT8_QK, _perm(300, 1, 2), _perm(300, 1, 2))
    q, k, v = _qkv(2, 2, 150, 260, 72, torch.float32, layout="bshd")
    m = block_mask_from_bool(torch.rand(1, 1, 2, 3) < 0.6, 150, 260, 128)
    res["quant_fp8_d72_cross_bshd_perm"] = quant_case(q, k, v, m, FP8, _perm(150), _perm(260))

    # --- attention kernel on the same quantised tensors
    # Random mask, ragged, 64-blocks, an empty query block, smoothed biased keys.
    q, k, v = _qkv(1, 2, 300, 300, 64, torch.float16, k_bias=3.0)
    bb = torch.rand(1, 2, 5, 5) < 0.5
    bb[0, 1, 2] = False
    m64 = block_mask_from_bool(bb, 300, 300, 64)
    for name, recipe in (("fp8", FP8), ("fp8_qk", FP8_QK), ("int8", INT8), ("int8_qk", INT8_QK)):
        res[f"attn_{name}_ragged_b64_empty_row"] = attn_case(q, k, v, m64, recipe)

    # Head dim 128, 128-blocks walked in BLOCK_N 64 sub-tiles, ragged, permutations (q and kv).
    q, k, v = _qkv(1, 1, 190, 250, 128, torch.float32)
    bb = torch.rand(1, 1, 2, 2) < 0.7
    bb[0, 0, :, 1] = True
    m = block_mask_from_bool(bb, 190, 250, 128)
    res["attn_fp8_d128_subtiles_perm"] = attn_case(q, k, v, m, FP8, _perm(190), _perm(250),
                                                   launch=Launch8bit(128, 64, 4, 1, False))
    # Two 64-row programs per 128-row query block (no tile statistics then), sub-tiles, q permutation.
    res["attn_fp8_split_rows"] = attn_case(q, k, v, m, FP8, _perm(190), None, launch=Launch8bit(64, 64, 4, 1, False),
                                           tile_stats=False)

    # Head dim 72 (padded to 128), (B, S, H, D) layout, broadcast mask over B=2, H=2, per-head permutations.
    q, k, v = _qkv(2, 2, 200, 200, 72, torch.float16, layout="bshd")
    m = block_mask_from_bool(torch.rand(1, 1, 4, 4) < 0.6, 200, 200, 64)
    res["attn_fp8_d72_bshd_broadcast_perm"] = attn_case(q, k, v, m, FP8, _perm(200, 1, 2), _perm(200, 1, 2))

    # FlexAttention full blocks next to partial ones.
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16)
    part = torch.rand(1, 2, 2, 2) < 0.5
    full = (torch.rand(1, 2, 2, 2) < 0.5) & ~part
    mp, mf = block_mask_from_bool(part, 256, 256), block_mask_from_bool(full, 256, 256)
    m = BlockMask.from_kv_blocks(mp.kv_num_blocks, mp.kv_indices, mf.kv_num_blocks, mf.kv_indices,
                                 BLOCK_SIZE=128, seq_lengths=(256, 256), compute_q_blocks=False)
    res["attn_fp8_partial_plus_full"] = attn_case(q, k, v, m, FP8)

    # A head subset (head_index): per-head mask over B=2, H=2, heads (0,1) and (1,0).
    q, k, v = _qkv(2, 2, 256, 256, 64, torch.float16, k_bias=1.0)
    m = block_mask_from_bool(torch.rand(2, 2, 2, 2) < 0.7, 256, 256)
    res["heads_fp8"] = heads_case(q, k, v, m, FP8, [1, 2])

    # --- public entry point: precision="fp8" runs the 8-bit kernel under the interpreter
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16, k_bias=2.0)
    m = block_mask_from_bool(torch.rand(1, 2, 2, 2) < 0.7, 256, 256)
    got = block_sparse_attention(q, k, v, m, return_lse=True, precision="fp8")
    ref = block_sparse_attention_reference(q, k, v, m, return_lse=True, precision="fp8")
    exact = block_sparse_attention_reference(q.float(), k.float(), v.float(), m, return_lse=True)
    bf = block_sparse_attention(q, k, v, m, return_lse=True)
    res["public_fp8"] = dict(
        supported=fp8_supported(q)[0],
        rel_err_vs_reference=_rel(got.out, ref.out),
        rel_err_vs_fp32=_rel(got.out, exact.out),
        lse_err_vs_fp32=float((_fin(got.lse) - _fin(exact.lse)).abs().max()),
        differs_from_16bit=_rel(got.out, bf.out),
    )
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
