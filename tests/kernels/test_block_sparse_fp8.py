"""The 8-bit path of block-sparse attention: torch reference arithmetic (CPU), precision handling and
fallback, and the Triton kernels in the interpreter against the reference (interp_checks_fp8.py).

What only the GPU checks (benchmarks/attention_kernel_fp8.py): the hardware fp8 conversion, TMA loads,
wgmma accumulation, bf16 dots, and speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_accel.kernels import (
    block_mask_from_bool,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_block_mask,
)
from dit_accel.kernels.block_sparse_common import check_inputs
from dit_accel.kernels.fp8_common import (
    PRECISIONS,
    QuantRecipe,
    check_precision,
    check_recipe,
    fp8_support,
    fp8_supported,
)
from dit_accel.kernels.fp8_reference import quantize_qkv_reference, round_fp8, round_int8

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _qkv(B=1, H=2, S=256, D=64, dtype=torch.float32, seed=0, k_bias=0.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    k = k + k_bias * torch.randn(1, 1, 1, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rel(x, ref) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


# ------------------------------------------------------------------------------------- rounding
def test_round_fp8_is_nearest_even_and_saturates():
    x = torch.tensor([1.0625, 1.1875, 84.0, 100.0, 500.0, -500.0, 0.003, 31.8])
    got = round_fp8(x).float().tolist()
    # Ties go to the even mantissa (1.0625 -> 1.0, 84 -> 80, 100 -> 96); beyond 448 saturates; a carry moves
    # into the exponent (31.8 -> 32); subnormals step by 2^-9.
    assert got == [1.0, 1.25, 80.0, 96.0, 448.0, -448.0, 0.00390625, 32.0]


def test_round_int8_is_half_away_from_zero_and_clamped():
    x = torch.tensor([0.5, -0.5, 1.49, -1.5, 126.6, 300.0, -300.0])
    assert round_int8(x).tolist() == [1, -1, 1, -2, 127, 127, -127]


# ---------------------------------------------------------------------------- quantisation layout
def test_quantize_reference_layout_scales_and_padding():
    q, k, v = _qkv(B=1, H=2, S=300, D=72, k_bias=4.0)
    mask = block_mask_from_bool(torch.ones(1, 1, 5, 5, dtype=torch.bool), 300, 300, 64)
    view = check_inputs(q, k, v, mask, None)
    qq = quantize_qkv_reference(q, k, v, view, QuantRecipe("fp8", "fp8"), row_bias=True)
    assert qq.q.shape == (1, 2, 320, 128) and qq.k.shape == (1, 2, 320, 128) and qq.v.shape == (1, 2, 128, 320)
    assert qq.q.dtype == qq.k.dtype == qq.v.dtype == torch.float8_e4m3fn
    assert qq.q_scale.shape == (1, 2, 5) and qq.k_scale.shape == (1, 2, 5) and qq.v_scale.shape == (1, 2, 128)
    # Padding rows repeat the last token; padding channels are zero.
    assert torch.equal(qq.q[:, :, 300:].float(), qq.q[:, :, 299:300].float().expand(-1, -1, 20, -1))
    assert float(qq.q[..., 72:].float().abs().max()) == 0.0
    # Scales are block maxima over 448; dequantised q is within e4m3's half step (2^-4 relative) of q.
    assert torch.allclose(qq.q_scale[0, 0, 0], q[0, 0, :64].abs().max() / 448)
    deq = qq.q[:, :, :300, :72].float() * qq.q_scale.repeat_interleave(64, dim=2)[:, :, :300, None]
    assert bool(((deq - q).abs() <= q.abs() / 16 + 2.0**-9 * qq.q_scale.max()).all())
    # K is smoothed: the mean over tokens is subtracted before quantisation.
    assert torch.allclose(qq.k_mean[..., :72], k.mean(dim=2), atol=1e-6)
    ks = qq.k[:, :, :300, :72].float() * qq.k_scale.repeat_interleave(64, dim=2)[:, :, :300, None]
    assert float(ks.mean(dim=2).abs().max()) < 0.05 < float(k.mean(dim=2).abs().max())
    # V is per channel, transposed.
    vd = qq.v[:, :, :72, :300].float().transpose(-1, -2) * qq.v_scale[:, :, None, :72]
    assert bool(((vd - v).abs() <= v.abs() / 16 + 1e-6).all())


# -------------------------------------------------------------------------- reference arithmetic
@pytest.mark.parametrize("D", [64, 128])
def test_fp8_reference_error_is_that_of_8bit_rounding(D):
    q, k, v = _qkv(S=512, D=D)
    mask = dense_block_mask(1, 1, 512, 512)
    exact = block_sparse_attention_reference(q, k, v, mask, return_lse=True, tile_stats=True)
    got = block_sparse_attention_reference(q, k, v, mask, return_lse=True, tile_stats=True, precision="fp8")
    err = _rel(got.out, exact.out)
    # int8 Q.K with block scales, e4m3 P.V (3 mantissa bits on P and V): about 4 % on random inputs.
    assert 0.01 < err < 0.06, err
    assert float((got.lse - exact.lse).abs().max()) < 0.1
    assert float((got.tile_stats - exact.tile_stats).abs().max()) < 0.3


def test_recipes_order_by_accuracy():
    q, k, v = _qkv(S=512, D=128, seed=3)
    mask = dense_block_mask(1, 1, 512, 512)
    from dit_accel.kernels.fp8_reference import block_sparse_attention_fp8_reference

    exact = block_sparse_attention_reference(q, k, v, mask)
    err = {r: _rel(block_sparse_attention_fp8_reference(q, k, v, mask, recipe=QuantRecipe(*r)), exact)
           for r in [("fp8", "fp8"), ("fp8", "16bit"), ("int8", "fp8"), ("int8", "16bit")]}
    # int8 Q.K with block scales is finer than e4m3 on Gaussian data; a 16-bit P.V removes the second error.
    assert err[("int8", "16bit")] < 0.02 < err[("fp8", "16bit")] < err[("fp8", "fp8")] < 0.08, err
    assert err[("int8", "16bit")] < err[("int8", "fp8")] < err[("fp8", "fp8")], err
    # precision="fp8" runs the more accurate of the two recipes with 8-bit P.V
    public = _rel(block_sparse_attention_reference(q, k, v, mask, precision="fp8"), exact)
    assert public == pytest.approx(err[("int8", "fp8")], rel=1e-6), (public, err)


def test_smoothing_makes_fp8_invariant_to_a_key_offset():
    q, k, v = _qkv(S=256, D=64, seed=1)
    mask = block_mask_from_bool(torch.rand(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.8, 256, 256)
    offset = 6.0 * torch.randn(1, 1, 1, 64)
    a = block_sparse_attention_reference(q, k, v, mask, return_lse=True, precision="fp8")
    b = block_sparse_attention_reference(q, k + offset, v, mask, return_lse=True, precision="fp8")
    fin = torch.isfinite(a.lse)
    assert _rel(b.out, a.out) < 1e-2
    # The LSE is that of the unsmoothed logits: it moves by scale * q . offset.
    shift = (q * offset).sum(-1) / math.sqrt(64)
    assert float((b.lse - a.lse - shift)[fin].abs().max()) < 1e-3


def test_fp8_reference_empty_rows_and_permutations():
    q, k, v = _qkv(S=300, D=64, seed=2)
    bb = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(1)) < 0.6
    bb[0, 0, 1] = False
    mask = block_mask_from_bool(bb, 300, 300, 64)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(2)).to(torch.int32)
    got = block_sparse_attention_reference(q, k, v, mask, return_lse=True, precision="fp8", q_index=perm,
                                           kv_index=perm)
    exact = block_sparse_attention_reference(q, k, v, mask, return_lse=True, q_index=perm, kv_index=perm)
    empty_rows = perm[64:128].long()
    assert float(got.out[0, 0, empty_rows].abs().max()) == 0.0
    assert bool(torch.isneginf(got.lse[0, 0, empty_rows]).all())
    assert torch.equal(torch.isinf(got.lse), torch.isinf(exact.lse))
    assert _rel(got.out, exact.out) < 0.08


# ---------------------------------------------------------------------------- precision handling
def test_precision_is_validated():
    q, k, v = _qkv(S=128)
    mask = dense_block_mask(1, 1, 128, 128)
    for bad in ("fp16", "FP8", None, 8):
        with pytest.raises(ValueError, match="precision must be one of"):
            block_sparse_attention(q, k, v, mask, precision=bad)
        with pytest.raises(ValueError, match="precision must be one of"):
            block_sparse_attention_reference(q, k, v, mask, precision=bad)
    assert check_precision("fp8") == "fp8" and PRECISIONS[0] == "bf16"
    with pytest.raises(ValueError, match="recipe.qk"):
        check_recipe(QuantRecipe("fp4", "fp8"))
    with pytest.raises(ValueError, match="recipe.pv"):
        check_recipe(QuantRecipe("fp8", "int8"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the fallback is for CPU without the interpreter")
def test_fp8_request_on_cpu_falls_back_to_bf16_and_says_why():
    q, k, v = _qkv(S=256)
    mask = dense_block_mask(1, 1, 256, 256)
    ok, reason = fp8_supported(q)
    assert not ok and "CPU" in reason
    a = block_sparse_attention(q, k, v, mask, return_lse=True, precision="fp8")
    b = block_sparse_attention(q, k, v, mask, return_lse=True)
    assert torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse)


def test_launch_config_follows_mask_blocks_and_tile_stats(monkeypatch):
    from dit_accel.kernels import block_sparse_fp8_triton as k8

    monkeypatch.setitem(k8._LAUNCH_8BIT, 128, k8.Launch8bit(64, 128, 4, 3, True))
    assert k8.kernel_config_8bit(128, 128, 128) == k8.Launch8bit(64, 128, 4, 3, True)
    # Tile statistics need one program per query block: 128 rows, two warpgroups.
    assert k8.kernel_config_8bit(128, 128, 128, tile_stats=True) == k8.Launch8bit(128, 128, 8, 3, True)
    # 64-blocks: BLOCK_N and rows follow the mask.
    assert k8.kernel_config_8bit(128, 64, 64) == k8.Launch8bit(64, 64, 4, 3, True)
    monkeypatch.setitem(k8._LAUNCH_8BIT, 128, k8.Launch8bit(128, 128, 8, 3, True))
    assert k8.kernel_config_8bit(128, 64, 128, tile_stats=True) == k8.Launch8bit(64, 128, 4, 3, True)


def test_fp8_support_decisions():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fp8_support(cuda, (9, 0), False, True)[0]
    assert fp8_support(cuda, (8, 9), False, True)[0]
    ok, reason = fp8_support(cuda, (8, 0), False, True)
    assert not ok and "8.9" in reason
    assert not fp8_support(cuda, (9, 0), True, True)[0]
    assert fp8_support(cpu, None, True, True)[0]
    assert not fp8_support(cpu, None, False, True)[0]
    ok, reason = fp8_support(cuda, (9, 0), False, False)
    assert not ok and "Triton" in reason
    with pytest.raises(ValueError, match="torch.Tensor"):
        fp8_supported("not a tensor")


# --------------------------------------------------------------------------------- interpreter
QUANT_CASES = ["quant_fp8_ragged_b64", "quant_int8_16bit_perm_per_head", "quant_fp8_d72_cross_bshd_perm"]
ATTN_CASES = [
    "attn_fp8_ragged_b64_empty_row",
    "attn_fp8_qk_ragged_b64_empty_row",
    "attn_int8_ragged_b64_empty_row",
    "attn_int8_qk_ragged_b64_empty_row",
    "attn_fp8_d128_subtiles_perm",
    "attn_fp8_split_rows",
    "attn_fp8_d72_bshd_broadcast_perm",
    "attn_fp8_partial_plus_full",
]


@pytest.fixture(scope="module")
def interp_results() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(HERE / "interp_checks_fp8.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", QUANT_CASES)
def test_quantisation_kernel_matches_reference_bytewise(interp_results: dict, case: str) -> None:
    r = interp_results[case]
    assert r["shapes_ok"] and r["q_equal"] and r["k_equal"] and r["v_equal"], r
    assert r["q_scale_equal"] and r["k_scale_equal"] and r["v_scale_equal"], r
    assert r["k_mean_err"] < 1e-5 and r["row_bias_err"] < 1e-5, r


@pytest.mark.parametrize("case", ATTN_CASES)
def test_attention_kernel_matches_reference_on_same_codes(interp_results: dict, case: str) -> None:
    r = interp_results[case]
    # Same 8-bit codes, exact 8-bit dots: only float32 rounding (exp2, sums) separates kernel and reference.
    assert r["rel_err"] < 1e-4, r
    assert not r["nan"], r
    assert r["lse_err"] < 1e-5 and r["lse_inf_match"], r
    if case != "attn_fp8_split_rows":
        assert not r["nan_ts"] and r["ts_err"] < 1e-5 and r["ts_inf_match"], r
    bound = 0.02 if case.startswith("attn_int8_qk") else 0.08
    assert r["rel_err_vs_fp32"] < bound, r


def test_public_entry_point_runs_fp8_kernel_in_interpreter(interp_results: dict) -> None:
    r = interp_results["public_fp8"]
    assert r["supported"]
    # The Triton pass sums the K mean in another order than torch: a few codes differ by one step.
    assert r["rel_err_vs_reference"] < 5e-3, r
    assert r["rel_err_vs_fp32"] < 0.08 and r["lse_err_vs_fp32"] < 0.1, r
    assert r["differs_from_16bit"] > 1e-3, r  # the 8-bit kernel ran, not the bf16 one


def test_head_subset_matches_reference_on_listed_heads(interp_results: dict) -> None:
    r = interp_results["heads_fp8"]
    assert r["rel_err"] < 1e-4 and not r["nan"] and r["lse_err"] < 1e-4 and r["lse_inf_match"], r
    assert r["ts_err"] < 1e-4 and r["others_ts_neg_inf"], r


def test_every_interpreter_case_ran(interp_results: dict) -> None:
    assert sorted(interp_results) == sorted(QUANT_CASES + ATTN_CASES + ["public_fp8", "heads_fp8"])
