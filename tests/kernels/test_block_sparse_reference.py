"""Block masks and the torch reference of block-sparse attention (CPU), and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from dit_accel.kernels import (
    BlockSparseOutput,
    block_mask_density,
    block_mask_from_bool,
    block_mask_from_scores,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_block_mask,
)


def _qkv(B=1, H=2, S=300, D=64, S_kv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S_kv = S if S_kv is None else S_kv
    return (torch.randn(B, H, S, D, generator=g, dtype=dtype), torch.randn(B, H, S_kv, D, generator=g, dtype=dtype),
            torch.randn(B, H, S_kv, D, generator=g, dtype=dtype))


def _token_mask(bb: torch.Tensor, S_q: int, S_kv: int, bs: int) -> torch.Tensor:
    return bb.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :S_q, :S_kv]


# --------------------------------------------------------------------------------------------- masks
def test_dense_block_mask_covers_everything():
    m = dense_block_mask(2, 3, 300, 200, block_size=128)
    assert isinstance(m, BlockMask)
    assert m.BLOCK_SIZE == (128, 128) and tuple(m.seq_lengths) == (300, 200)
    assert m.kv_num_blocks.shape == (2, 3, 3) and m.kv_indices.shape == (2, 3, 3, 2)
    assert bool(m.to_dense().all())
    assert block_mask_density(m) == 1.0


def test_block_mask_from_bool_roundtrip_and_density():
    bb = torch.rand(2, 3, 4, 5) < 0.4
    bb[0, 0, 1] = False
    m = block_mask_from_bool(bb, 4 * 64 - 3, 5 * 64 - 10, block_size=64)
    assert torch.equal(m.to_dense().bool(), bb)
    assert m.kv_indices.dtype == torch.int32 and m.kv_num_blocks.dtype == torch.int32
    assert block_mask_density(m) == pytest.approx(bb.float().mean().item())
    # Listed indices come first, in ascending order.
    n = int(m.kv_num_blocks[1, 2, 3])
    listed = m.kv_indices[1, 2, 3, :n].tolist()
    assert listed == sorted(listed) and listed == torch.nonzero(bb[1, 2, 3]).flatten().tolist()


def test_block_mask_from_scores_top_k_and_diagonal():
    scores = torch.rand(1, 2, 6, 6)
    m = block_mask_from_scores(scores, top_k=2, keep_diagonal=False, q_len=6 * 128, kv_len=6 * 128)
    dense = m.to_dense().bool()
    assert bool((dense.sum(-1) == 2).all())
    expect = torch.zeros_like(dense).scatter(-1, scores.topk(2, dim=-1).indices, True)
    assert torch.equal(dense, expect)
    m2 = block_mask_from_scores(scores, top_k=1, keep_diagonal=True, q_len=6 * 128, kv_len=6 * 128)
    d2 = m2.to_dense().bool()
    assert bool(d2[..., torch.arange(6), torch.arange(6)].all())
    assert bool((d2.sum(-1) <= 2).all() and (d2.sum(-1) >= 1).all())


def test_block_mask_from_scores_top_p_and_min_blocks():
    # One row with mass 0.5, 0.3, 0.15, 0.05: top_p=0.75 needs the first two blocks, 0.85 three.
    s = torch.tensor([0.05, 0.5, 0.15, 0.3]).view(1, 1, 1, 4)
    pick = lambda **kw: block_mask_from_scores(s, keep_diagonal=False, q_len=100, kv_len=512, **kw).to_dense()[0, 0, 0].bool().tolist()  # noqa: E731
    assert pick(top_p=0.75) == [False, True, False, True]
    assert pick(top_p=0.85) == [False, True, True, True]
    assert pick(top_p=0.85, top_k=2) == [False, True, False, True]
    assert pick(top_p=0.1, min_blocks=3) == [False, True, True, True]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "top_k, top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_block_mask_from_scores_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        block_mask_from_scores(torch.rand(1, 1, 2, 2), q_len=256, kv_len=256, **kwargs)


def test_block_mask_helpers_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, H, 3, 2\]"):
        block_mask_from_bool(torch.ones(1, 1, 2, 2, dtype=torch.bool), 300, 200)
    with pytest.raises(ValueError, match="bool"):
        block_mask_from_bool(torch.ones(1, 1, 3, 2), 300, 200)
    with pytest.raises(ValueError, match="block_size"):
        dense_block_mask(1, 1, 100, 100, block_size=96)


# ------------------------------------------------------------------------------------------ reference
def test_reference_dense_equals_sdpa():
    q, k, v = _qkv(S=300, D=64)
    out = block_sparse_attention_reference(q, k, v, dense_block_mask(1, 1, 300, 300))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D, bs, S_q, S_kv", [(64, 128, 300, 300), (128, 64, 190, 250), (72, 64, 130, 130)])
def test_reference_random_mask_equals_masked_sdpa(D, bs, S_q, S_kv):
    torch.manual_seed(D + bs)
    q, k, v = _qkv(B=2, H=2, S=S_q, S_kv=S_kv, D=D)
    bb = torch.rand(2, 2, math.ceil(S_q / bs), math.ceil(S_kv / bs)) < 0.6
    bb[..., 0] = True  # no empty row here: SDPA returns NaN for fully masked rows
    out = block_sparse_attention_reference(q, k, v, block_mask_from_bool(bb, S_q, S_kv, bs), scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_token_mask(bb, S_q, S_kv, bs), scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_reference_lse_and_empty_rows():
    q, k, v = _qkv(S=260, D=64)
    bb = torch.rand(1, 2, 3, 3) < 0.7
    bb[0, 0, 1] = False  # query block 1 of head 0 attends to nothing
    bb[0, 1, :, 0] = True
    res = block_sparse_attention_reference(q, k, v, block_mask_from_bool(bb, 260, 260), return_lse=True)
    assert isinstance(res, BlockSparseOutput) and res.tile_stats is None
    assert not torch.isnan(res.out).any()
    assert bool((res.out[0, 0, 128:256] == 0).all())
    assert bool(torch.isneginf(res.lse[0, 0, 128:256]).all())
    logits = (q @ k.transpose(-1, -2)) / 8.0
    logits = logits.masked_fill(~_token_mask(bb, 260, 260, 128), float("-inf"))
    expect = torch.logsumexp(logits, -1)
    fin = torch.isfinite(expect)
    assert torch.equal(fin, torch.isfinite(res.lse))
    torch.testing.assert_close(res.lse[fin], expect[fin], atol=1e-5, rtol=1e-5)


def test_reference_tile_stats_bound_tile_probabilities():
    q, k, v = _qkv(S=300, D=64)
    bb = torch.rand(1, 2, 5, 5) < 0.5
    bb[..., 0] = True
    res = block_sparse_attention_reference(q, k, v, block_mask_from_bool(bb, 300, 300, 64), return_lse=True,
                                           tile_stats=True)
    ts = res.tile_stats
    assert ts.shape == (1, 2, 5, 5) and ts.dtype == torch.float32
    assert torch.equal(torch.isfinite(ts), bb)
    assert bool((ts[bb] <= 1e-6).all())
    # Brute force: for every computed tile, max logit - min LSE over the tile's rows.
    logits = (q @ k.transpose(-1, -2)) / 8.0
    probs = torch.exp(logits.masked_fill(~_token_mask(bb, 300, 300, 64), float("-inf")) - res.lse.unsqueeze(-1))
    for h in range(2):
        for qb in range(5):
            rows = slice(qb * 64, min(300, qb * 64 + 64))
            for kb in range(5):
                if not bb[0, h, qb, kb]:
                    continue
                cols = slice(kb * 64, min(300, kb * 64 + 64))
                expect = logits[0, h, rows, cols].max() - res.lse[0, h, rows].min()
                assert float(ts[0, h, qb, kb]) == pytest.approx(float(expect), abs=1e-5)
                # The bound: no probability in the tile exceeds exp(stat).
                assert float(probs[0, h, rows, cols].max()) <= math.exp(float(ts[0, h, qb, kb])) * (1 + 1e-5)


def test_reference_broadcast_and_full_blocks():
    q, k, v = _qkv(B=2, H=3, S=256, D=64)
    bb = torch.rand(1, 1, 2, 2) < 0.6
    bb[..., 0] = True
    m = block_mask_from_bool(bb, 256, 256)
    out = block_sparse_attention_reference(q, k, v, m)
    expect = F.scaled_dot_product_attention(q, k, v, attn_mask=_token_mask(bb, 256, 256, 128))
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    as_full = BlockMask.from_kv_blocks(torch.zeros_like(m.kv_num_blocks), m.kv_indices, m.kv_num_blocks,
                                       m.kv_indices, BLOCK_SIZE=128, seq_lengths=(256, 256), compute_q_blocks=False)
    torch.testing.assert_close(block_sparse_attention_reference(q, k, v, as_full), out)


def test_public_entry_point_uses_reference_on_cpu():
    q, k, v = _qkv(S=200, D=128, dtype=torch.bfloat16)
    bb = torch.rand(1, 2, 2, 2) < 0.5
    m = block_mask_from_bool(bb, 200, 200)
    got = block_sparse_attention(q, k, v, m, return_lse=True, tile_stats=True)
    ref = block_sparse_attention_reference(q, k, v, m, return_lse=True, tile_stats=True)
    assert got.out.dtype == torch.bfloat16 and got.out.shape == q.shape
    assert torch.equal(got.out, ref.out) and torch.equal(got.lse, ref.lse)
    assert torch.equal(got.tile_stats, ref.tile_stats)
    assert isinstance(block_sparse_attention(q, k, v, m), torch.Tensor)


# ------------------------------------------------------------------------------------------ validation
def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), r"4-D \(B, H, S, D\), got shape \(2, 300, 64\)"),
        (lambda q, k, v, m: (q, k[:, :, :, :32], v, m), r"k \(1, 2, 300, 32\)"),
        (lambda q, k, v, m: (q.half(), k, v, m), "share one dtype"),
        (lambda q, k, v, m: (q.int(), k, v, m), "dtype torch.int32"),
        (lambda q, k, v, m: (q, k, v, dense_block_mask(1, 1, 256, 300)), r"seq_lengths \(256, 300\)"),
        (lambda q, k, v, m: (q, k, v, dense_block_mask(1, 3, 300, 300)), "heads size 3"),
        (lambda q, k, v, m: (q, k, v, "mask"), "BlockMask"),
        (lambda q, k, v, m: (q, k, v, create_block_mask(_causal, 1, 1, 300, 300, device="cpu")), "mask_mod"),
        (lambda q, k, v, m: (q[..., :48], k[..., :48], v[..., :48], m), "head dim 48"),
        (lambda q, k, v, m: (q, k, v, BlockMask.from_kv_blocks(
            m.kv_num_blocks[:, :, :2], m.kv_indices[:, :, :2], seq_lengths=(300, 300), compute_q_blocks=False)),
         r"\[\*, \*, 3\]"),
    ],
)
def test_bad_inputs_raise_value_error_naming_them(make, match):
    q, k, v = _qkv(S=300, D=64)
    args = make(q, k, v, dense_block_mask(1, 1, 300, 300))
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*args)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention_reference(*args)


def test_bad_scale_and_device():
    q, k, v = _qkv(S=128, D=64)
    m = dense_block_mask(1, 1, 128, 128)
    with pytest.raises(ValueError, match="scale"):
        block_sparse_attention(q, k, v, m, scale=-1.0)
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        with pytest.raises(ValueError, match="device"):
            block_sparse_attention(q.cuda(), k, v, m)
    meta_q = torch.empty(1, 2, 128, 64, device="meta")
    with pytest.raises(ValueError, match="one device"):
        block_sparse_attention(meta_q, k, v, m)
