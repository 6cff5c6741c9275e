"""Token permutations folded into block-sparse attention (``q_index`` / ``kv_index``): the torch
reference against explicit gather / scatter and SDPA, and the validation of bad indices (CPU).

The Triton kernel's indexed path is checked in the interpreter by test_block_sparse_triton.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_accel.kernels import (
    block_mask_from_bool,
    block_sparse_attention,
    block_sparse_attention_reference,
    dense_block_mask,
)
from dit_accel.kernels.reference_common import gather_rows, scatter_rows


def _qkv(B=1, H=2, S=300, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g, dtype=dtype) for _ in range(3))


def _perm(S: int, *lead: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.argsort(torch.rand(*lead, S, generator=g), dim=-1).to(torch.int32)


def test_gather_scatter_rows_are_inverse():
    x = torch.randn(2, 3, 50, 8)
    for p in (_perm(50), _perm(50, 2, 3), _perm(50, 1, 3)):
        assert torch.equal(scatter_rows(gather_rows(x, p), p), x)
        assert torch.equal(gather_rows(x, p)[0, 0, 7], x[0, 0, int(p.reshape(-1, 50)[0, 7])])


@pytest.mark.parametrize(
    "dtype, D, S, bs, lead",
    [
        (torch.float32, 64, 300, 64, ()),  # ragged, shared order
        (torch.bfloat16, 128, 200, 128, (1, 2)),  # per-head order, broadcast over the batch
        (torch.float16, 72, 130, 64, (2, 2)),  # per-(batch, head) order
    ],
)
def test_reference_index_equals_gather_run_scatter(dtype, D, S, bs, lead):
    q, k, v = _qkv(B=2, H=2, S=S, D=D, dtype=dtype)
    nb = -(-S // bs)
    bb = torch.rand(2, 2, nb, nb, generator=torch.Generator().manual_seed(1)) < 0.5
    bb[0, 1, 1] = False  # an empty query block
    m = block_mask_from_bool(bb, S, S, bs)
    p = _perm(S, *lead)
    got = block_sparse_attention_reference(q, k, v, m, return_lse=True, tile_stats=True, q_index=p, kv_index=p)
    plain = block_sparse_attention_reference(gather_rows(q, p), gather_rows(k, p), gather_rows(v, p), m,
                                             return_lse=True, tile_stats=True)
    assert torch.equal(got.out, scatter_rows(plain.out, p))
    assert torch.equal(got.lse, scatter_rows(plain.lse.unsqueeze(-1), p).squeeze(-1))
    assert torch.equal(got.tile_stats, plain.tile_stats)  # block coordinates: the permuted order
    # The public entry point on CPU is the reference.
    pub = block_sparse_attention(q, k, v, m, return_lse=True, tile_stats=True, q_index=p, kv_index=p)
    assert torch.equal(pub.out, got.out) and torch.equal(pub.lse, got.lse)


def test_reference_dense_mask_with_index_equals_sdpa():
    q, k, v = _qkv(S=260)
    p = _perm(260)
    out = block_sparse_attention_reference(q, k, v, dense_block_mask(1, 1, 260, 260), q_index=p, kv_index=p)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_identity_index_equals_no_index():
    q, k, v = _qkv(S=200)
    m = dense_block_mask(1, 1, 200, 200)
    ident = torch.arange(200, dtype=torch.int32)
    assert torch.equal(block_sparse_attention(q, k, v, m, q_index=ident, kv_index=ident),
                       block_sparse_attention(q, k, v, m))


@pytest.mark.parametrize(
    "which, index, match",
    [
        ("q_index", torch.arange(200), r"q_index must be int32, got torch.int64"),
        ("kv_index", torch.arange(200).float(), r"kv_index must be int32, got torch.float32"),
        ("q_index", [0, 1], r"q_index must be a torch.Tensor"),
        ("q_index", torch.arange(199, dtype=torch.int32), r"q_index has shape \(199,\); expected \(200,\)"),
        ("kv_index", torch.arange(200, dtype=torch.int32).view(1, 200), r"kv_index has shape \(1, 200\)"),
        ("kv_index", torch.arange(200, dtype=torch.int32).expand(1, 3, 200), r"H in \(1, 2\)"),
        ("q_index", torch.zeros(200, dtype=torch.int32), r"q_index must be a permutation of 0..199"),
        ("kv_index", torch.arange(1, 201, dtype=torch.int32), r"kv_index must be a permutation .*\[1, 200\]"),
        ("q_index", torch.arange(200, dtype=torch.int32, device="meta"), r"q_index is on meta"),
    ],
)
def test_bad_index_raises_value_error_naming_it(which, index, match):
    q, k, v = _qkv(S=200)
    m = dense_block_mask(1, 1, 200, 200)
    for fn in (block_sparse_attention, block_sparse_attention_reference):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, m, **{which: index})


def test_index_checked_again_after_in_place_change():
    q, k, v = _qkv(S=128)
    m = dense_block_mask(1, 1, 128, 128)
    p = _perm(128)
    block_sparse_attention(q, k, v, m, q_index=p)  # passes and is remembered
    p[0] = p[1]  # no longer a permutation: the in-place version counter changed
    with pytest.raises(ValueError, match="permutation"):
        block_sparse_attention(q, k, v, m, q_index=p)


def test_index_made_in_inference_mode():
    # Inference tensors have no version counter; the check must still run (and remember the tensor).
    q, k, v = _qkv(S=128)
    m = dense_block_mask(1, 1, 128, 128)
    with torch.inference_mode():
        p = _perm(128)
        bad = torch.zeros(128, dtype=torch.int32)
        out = block_sparse_attention(q, k, v, m, q_index=p, kv_index=p)
        with pytest.raises(ValueError, match="permutation"):
            block_sparse_attention(q, k, v, m, q_index=bad)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, m), atol=1e-5, rtol=1e-5)
