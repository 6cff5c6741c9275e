"""A head subset of block-sparse attention (``head_index``): the torch reference on the listed heads equals the
reference on every head there, in bf16 and in the 8-bit arithmetic, with masks, permutations and statistics;
bad subsets are refused (CPU). The Triton kernels' head subset is checked in the interpreter by
test_block_sparse_triton.py and test_block_sparse_fp8.py."""

from __future__ import annotations

import pytest
import torch

from dit_accel.kernels import block_mask_from_bool, block_sparse_attention, block_sparse_attention_reference


def _qkv(B=2, H=3, S=300, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("mask_heads, perm_lead", [((2, 3), (1, 3)), ((1, 1), ())])
def test_head_subset_equals_full_reference_on_listed_heads(precision, mask_heads, perm_lead):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    mask = block_mask_from_bool(torch.rand(*mask_heads, 3, 3, generator=g) < 0.6, 300, 300)
    perm = torch.argsort(torch.rand(*perm_lead, 300, generator=g), dim=-1).to(torch.int32)
    heads = torch.tensor([0, 4, 5], dtype=torch.int32)
    kw = dict(return_lse=True, tile_stats=True, q_index=perm, kv_index=perm, precision=precision)
    full = block_sparse_attention_reference(q, k, v, mask, **kw)
    part = block_sparse_attention_reference(q, k, v, mask, head_index=heads, **kw)
    listed = torch.zeros(6, dtype=torch.bool)
    listed[heads.long()] = True
    listed = listed.view(2, 3)
    assert torch.allclose(part.out[listed], full.out[listed], atol=1e-6)
    assert torch.equal(torch.isinf(part.lse[listed]), torch.isinf(full.lse[listed]))
    fin = torch.isfinite(full.tile_stats[listed])
    assert torch.allclose(part.tile_stats[listed][fin], full.tile_stats[listed][fin], atol=1e-5)
    assert torch.isneginf(part.tile_stats[~listed]).all() and (part.out[~listed] == 0).all()


def test_public_entry_runs_the_reference_on_the_subset():
    q, k, v = _qkv(B=1, H=4, S=256)
    mask = block_mask_from_bool(torch.ones(1, 1, 2, 2, dtype=torch.bool), 256, 256)
    out = block_sparse_attention(q, k, v, mask, head_index=torch.tensor([1, 3], dtype=torch.int32))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out[:, [1, 3]], ref[:, [1, 3]], atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1, 1], dtype=torch.int32), "strictly ascending"),
    (torch.tensor([3, 1], dtype=torch.int32), "strictly ascending"),
    (torch.tensor([0, 6], dtype=torch.int32), r"\[0, 6\)"),
    (torch.tensor([0, 1], dtype=torch.int64), "int32"),
    (torch.zeros(0, dtype=torch.int32), "between 1 and"),
    ([0, 1], "torch.Tensor"),
])
def test_bad_head_subsets_are_refused(bad, match):
    q, k, v = _qkv(S=128)
    mask = block_mask_from_bool(torch.ones(1, 1, 1, 1, dtype=torch.bool), 128, 128)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, mask, head_index=bad)
