"""Runs the Triton block-sparse kernel in the Triton interpreter on tiny CPU inputs and prints, as one JSON
object, its errors against the torch reference for each case. Started by test_block_sparse_triton.py in a
subprocess with TRITON_INTERPRET=1 (that variable must be set before Triton kernels are defined, and
must not leak into the other tests' process).

Interpreter limits (see /work/shared/cpu.md): bf16 tl.dot is wrong in the interpreter, so cases use
float16/float32 (bf16 is checked on the GPU by benchmarks/attention_kernel.py --check).
"""

from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1")

import interp_patch  # noqa: E402,F401  (numpy >= 2.4: loop bounds read from memory)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask  # noqa: E402

from dit_accel.kernels import block_mask_from_bool, block_sparse_attention, dense_block_mask  # noqa: E402
from dit_accel.kernels.block_sparse_common import check_inputs  # noqa: E402
from dit_accel.kernels.block_sparse_reference import block_sparse_attention_reference  # noqa: E402
from dit_accel.kernels.reference_common import gather_rows, scatter_rows  # noqa: E402
from dit_accel.kernels.block_sparse_triton import block_sparse_attention_triton  # noqa: E402


def _fin(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _compare(got, ref) -> dict:
    out_g, out_r = got.out.float(), ref.out.float()
    return dict(
        rel_err=float((out_g - out_r).norm() / out_r.norm().clamp_min(1e-30)),
        max_abs_err=float((out_g - out_r).abs().max()),
        nan=bool(torch.isnan(got.out).any() or torch.isnan(got.lse).any() or torch.isnan(got.tile_stats).any()),
        lse_err=float((_fin(got.lse) - _fin(ref.lse)).abs().max()),
        lse_inf_match=bool(torch.equal(torch.isinf(got.lse), torch.isinf(ref.lse))),
        ts_err=float((_fin(got.tile_stats) - _fin(ref.tile_stats)).abs().max()),
        ts_inf_match=bool(torch.equal(torch.isinf(got.tile_stats), torch.isinf(ref.tile_stats))),
    )


def _qkv(B, H, S_q, S_kv, D, dtype, layout="bhsd"):
    if layout == "bshd":
        mk = lambda S: torch.randn(B, S, H, D, dtype=dtype).transpose(1, 2)  # noqa: E731
    else:
        mk = lambda S: torch.randn(B, H, S, D, dtype=dtype)  # noqa: E731
    return mk(S_q), mk(S_kv), mk(S_kv)


def _run(q, k, v, mask, config=None):
    view = check_inputs(q, k, v, mask, None)
    got = block_sparse_attention_triton(q, k, v, view, return_lse=True, tile_stats=True, config=config)
    ref = block_sparse_attention_reference(q, k, v, mask, return_lse=True, tile_stats=True)
    return _compare(got, ref)


def main() -> None:
    torch.manual_seed(0)
    res: dict = {}

    # Full density, compared with SDPA too (float32: exact up to rounding).
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float32)
    m = dense_block_mask(1, 2, 256, 256)
    r = _run(q, k, v, m)
    out = block_sparse_attention(q, k, v, m)  # public entry point: Triton, since TRITON_INTERPRET=1
    r["sdpa_rel_err"] = float((out - F.scaled_dot_product_attention(q, k, v)).norm()
                              / F.scaled_dot_product_attention(q, k, v).norm())
    res["dense_fp32_d64"] = r

    # Random masks, ragged tails, float16, 64-blocks; plus one empty query block.
    q, k, v = _qkv(1, 2, 300, 300, 64, torch.float16)
    bb = torch.rand(1, 2, 5, 5) < 0.5
    bb[0, 1, 2] = False
    res["random_fp16_ragged_b64_empty_row"] = _run(q, k, v, block_mask_from_bool(bb, 300, 300, 64))

    # Head dim 72 (padded to 128 in the kernel), float32, q block 64.
    q, k, v = _qkv(1, 2, 200, 200, 72, torch.float32)
    bb = torch.rand(1, 2, 4, 4) < 0.6
    res["d72_fp32_b64"] = _run(q, k, v, block_mask_from_bool(bb, 200, 200, 64))

    # Head dim 128, float32, ragged, key block 128 walked in sub-tiles of BLOCK_N 32 and 64.
    q, k, v = _qkv(1, 1, 190, 190, 128, torch.float32)
    bb = torch.rand(1, 1, 2, 2) < 0.7
    bb[0, 0, 0] = False
    m = block_mask_from_bool(bb, 190, 190, 128)
    res["d128_fp32_subtiles_32"] = _run(q, k, v, m, config=(32, 4, 1))
    res["d128_fp32_subtiles_64"] = _run(q, k, v, m, config=(64, 4, 1))

    # Cross lengths S_q != S_kv, transposed (B, S, H, D) layout, broadcast mask (B=1, H=1) over B=2, H=2.
    q, k, v = _qkv(2, 2, 150, 260, 64, torch.float16, layout="bshd")
    bb = torch.rand(1, 1, 3, 5) < 0.6
    res["cross_len_bshd_broadcast"] = _run(q, k, v, block_mask_from_bool(bb, 150, 260, 64))

    # FlexAttention full blocks (full_kv_*) next to partial ones: both are computed in full.
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16)
    part = torch.rand(1, 2, 2, 2) < 0.5
    full = (torch.rand(1, 2, 2, 2) < 0.5) & ~part
    mp = block_mask_from_bool(part, 256, 256)
    mf = block_mask_from_bool(full, 256, 256)
    m = BlockMask.from_kv_blocks(mp.kv_num_blocks, mp.kv_indices, mf.kv_num_blocks, mf.kv_indices,
                                 BLOCK_SIZE=128, seq_lengths=(256, 256), compute_q_blocks=False)
    res["partial_plus_full_blocks"] = _run(q, k, v, m)

    # A mask with no block at all: zeros and LSE -inf everywhere.
    q, k, v = _qkv(1, 1, 130, 130, 64, torch.float16)
    m = block_mask_from_bool(torch.zeros(1, 1, 2, 2, dtype=torch.bool), 130, 130)
    r = _run(q, k, v, m)
    got = block_sparse_attention(q, k, v, m, return_lse=True)
    r["all_zero_out"] = bool((got.out == 0).all())
    r["all_lse_neg_inf"] = bool(torch.isneginf(got.lse).all())
    res["empty_mask"] = r

    res.update(index_cases())
    res.update(head_cases())
    json.dump(res, sys.stdout)


def _indexed(q, k, v, mask, qi, ki, config=None) -> dict:
    """Indexed kernel vs the indexed reference, vs (explicit gather, unindexed kernel, scatter), and the
    bit-level agreement of the two kernel paths."""
    view = check_inputs(q, k, v, mask, None)
    got = block_sparse_attention_triton(q, k, v, view, return_lse=True, tile_stats=True, config=config,
                                        q_index=qi, kv_index=ki)
    ref = block_sparse_attention_reference(q, k, v, mask, return_lse=True, tile_stats=True, q_index=qi, kv_index=ki)
    r = _compare(got, ref)
    qp, kp, vp = gather_rows(q, qi), gather_rows(k, ki), gather_rows(v, ki)
    plain = block_sparse_attention_triton(qp, kp, vp, check_inputs(qp, kp, vp, mask, None), return_lse=True,
                                          tile_stats=True, config=config)
    out_x = scatter_rows(plain.out, qi)
    lse_x = scatter_rows(plain.lse.unsqueeze(-1), qi).squeeze(-1)
    r["explicit_out_max_diff"] = float((got.out.float() - out_x.float()).abs().max())
    r["explicit_bitwise"] = bool(torch.equal(got.out, out_x) and torch.equal(got.lse, lse_x)
                                 and torch.equal(got.tile_stats, plain.tile_stats))
    return r


def _perm(S: int, *lead: int) -> torch.Tensor:
    if not lead:
        return torch.randperm(S).to(torch.int32)
    return torch.argsort(torch.rand(*lead, S), dim=-1).to(torch.int32)


def index_cases() -> dict:
    """Token permutations folded into the kernel's loads and stores (q_index / kv_index)."""
    torch.manual_seed(1)
    res: dict = {}

    # Shared (S,) permutation, float16, ragged S=300 with 64-blocks, one empty query block.
    q, k, v = _qkv(1, 2, 300, 300, 64, torch.float16)
    bb = torch.rand(1, 2, 5, 5) < 0.5
    bb[0, 0, 3] = False
    m = block_mask_from_bool(bb, 300, 300, 64)
    p = _perm(300)
    res["index_fp16_d64_ragged"] = _indexed(q, k, v, m, p, p)

    # Identity index == no index, bit for bit (same loads, same arithmetic).
    ident = torch.arange(300, dtype=torch.int32)
    view = check_inputs(q, k, v, m, None)
    a = block_sparse_attention_triton(q, k, v, view, return_lse=True, tile_stats=True, q_index=ident, kv_index=ident)
    b = block_sparse_attention_triton(q, k, v, view, return_lse=True, tile_stats=True)
    res["index_identity_bitwise"] = dict(
        equal=bool(torch.equal(a.out, b.out) and torch.equal(a.lse, b.lse) and torch.equal(a.tile_stats, b.tile_stats))
    )

    # Per-head (1, H, S) permutations broadcast over B=2, head dim 72 (padded), float32, (B, S, H, D) layout.
    q, k, v = _qkv(2, 2, 200, 200, 72, torch.float32, layout="bshd")
    bb = torch.rand(2, 2, 4, 4) < 0.6
    p = _perm(200, 1, 2)
    res["index_per_head_d72_bshd"] = _indexed(q, k, v, block_mask_from_bool(bb, 200, 200, 64), p, p)

    # Head dim 128, cross lengths (q 190, kv 250), 128-blocks walked in BLOCK_N=64 sub-tiles, separate indices;
    # then each index alone.
    q, k, v = _qkv(1, 1, 190, 250, 128, torch.float32)
    bb = torch.rand(1, 1, 2, 2) < 0.7
    bb[0, 0, :, 1] = True
    m = block_mask_from_bool(bb, 190, 250, 128)
    pq, pk = _perm(190), _perm(250)
    res["index_d128_cross_subtiles"] = _indexed(q, k, v, m, pq, pk, config=(64, 4, 1))
    res["index_q_only_d128"] = _indexed(q, k, v, m, pq, None, config=(64, 4, 1))
    res["index_kv_only_d128"] = _indexed(q, k, v, m, None, pk, config=(64, 4, 1))

    # Public entry point with a dense mask: attention is permutation-equivariant, so the result in the
    # original order equals plain SDPA.
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float32)
    p = _perm(256)
    out = block_sparse_attention(q, k, v, dense_block_mask(1, 2, 256, 256), q_index=p, kv_index=p)
    ref = F.scaled_dot_product_attention(q, k, v)
    res["index_dense_vs_sdpa"] = dict(rel_err=float((out - ref).norm() / ref.norm()))
    return res


def _heads(q, k, v, mask, heads, qi=None, ki=None) -> dict:
    """Kernel on a head subset vs the reference on every head, compared on the listed heads; the other heads'
    tile statistics must stay -inf and their output rows untouched."""
    B, H = q.shape[:2]
    index = torch.tensor(heads, dtype=torch.int32)
    view = check_inputs(q, k, v, mask, None)
    got = block_sparse_attention_triton(q, k, v, view, return_lse=True, tile_stats=True, q_index=qi, kv_index=ki,
                                        head_index=index)
    ref = block_sparse_attention_reference(q, k, v, mask, return_lse=True, tile_stats=True, q_index=qi, kv_index=ki)
    listed = torch.zeros(B * H, dtype=torch.bool)
    listed[index.long()] = True
    listed = listed.view(B, H)
    sub = lambda r: type(ref)(r.out[listed], r.lse[listed], r.tile_stats[listed])  # noqa: E731
    res = _compare(sub(got), sub(ref))
    res["others_ts_neg_inf"] = bool(torch.isneginf(got.tile_stats[~listed]).all())
    return res


def head_cases() -> dict:
    """A head subset (head_index): the grid covers the listed heads only."""
    torch.manual_seed(2)
    res: dict = {}
    # Per-head mask over B=2, H=3, ragged float16, 64-blocks; heads (0,1), (1,0), (1,2).
    q, k, v = _qkv(2, 3, 300, 300, 64, torch.float16, layout="bshd")
    bb = torch.rand(2, 3, 5, 5) < 0.5
    res["heads_per_head_mask_fp16"] = _heads(q, k, v, block_mask_from_bool(bb, 300, 300, 64), [1, 3, 5])
    # Broadcast mask (1, 1) and per-head permutations (1, H, S), head dim 72; one head.
    q, k, v = _qkv(2, 2, 200, 200, 72, torch.float32)
    m = block_mask_from_bool(torch.rand(1, 1, 4, 4) < 0.6, 200, 200, 64)
    p = _perm(200, 1, 2)
    res["heads_broadcast_perm_d72"] = _heads(q, k, v, m, [2], p, p)
    return res


if __name__ == "__main__":
    main()
