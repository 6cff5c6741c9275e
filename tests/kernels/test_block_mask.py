"""``block_mask_from_bool`` (sort-free compaction) against the definition: per row, the selected key blocks in
ascending order, then the unselected ones ascending as padding (what a stable argsort of "not selected" gives)."""

from __future__ import annotations

import pytest
import torch

from dit_accel.kernels import block_mask_from_bool


def _by_definition(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    num = keep.sum(dim=-1, dtype=torch.int32)
    idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num, idx


@pytest.mark.parametrize("case", ["random", "empty", "full", "one_column", "broadcast", "ragged"])
def test_block_mask_from_bool_matches_the_definition(case: str) -> None:
    g = torch.Generator().manual_seed(0)
    shape, q_len, kv_len = (2, 3, 5, 7), 5 * 128, 7 * 128
    if case == "random":
        keep = torch.rand(shape, generator=g) < 0.4
    elif case == "empty":
        keep = torch.zeros(shape, dtype=torch.bool)
    elif case == "full":
        keep = torch.ones(shape, dtype=torch.bool)
    elif case == "one_column":
        keep = torch.zeros(shape, dtype=torch.bool)
        keep[..., 3] = True
    elif case == "broadcast":
        keep = torch.rand(1, 1, 5, 7, generator=g) < 0.5
    else:  # ragged tails on both sides, 64-token blocks
        keep = torch.rand(2, 3, 4, 6, generator=g) < 0.5
        q_len, kv_len = 3 * 64 + 10, 5 * 64 + 1
    block = 64 if case == "ragged" else 128
    mask = block_mask_from_bool(keep, q_len, kv_len, block)
    num, idx = _by_definition(keep)
    assert torch.equal(mask.kv_num_blocks, num)
    assert torch.equal(mask.kv_indices, idx)


def test_block_mask_from_indices_wraps_compacted_rows() -> None:
    """``block_mask_from_indices`` builds the same BlockMask from rows compacted elsewhere (the draft selection
    kernel writes them as ``block_mask_from_bool`` does) and names bad shapes and dtypes."""
    from dit_accel.kernels import block_mask_from_indices

    keep = torch.rand(2, 3, 4, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    ref = block_mask_from_bool(keep, 3 * 64 + 10, 5 * 64 + 1, 64)
    mask = block_mask_from_indices(ref.kv_num_blocks, ref.kv_indices, 3 * 64 + 10, 5 * 64 + 1, 64)
    assert torch.equal(mask.kv_num_blocks, ref.kv_num_blocks) and torch.equal(mask.kv_indices, ref.kv_indices)
    assert mask.seq_lengths == ref.seq_lengths and mask.BLOCK_SIZE == ref.BLOCK_SIZE
    assert mask.q_indices is None  # forward only, as block_mask_from_bool
    with pytest.raises(ValueError, match=r"kv_indices must be int32 \[B, H, 4, 6\]"):
        block_mask_from_indices(ref.kv_num_blocks, ref.kv_indices.long(), 3 * 64 + 10, 5 * 64 + 1, 64)
    with pytest.raises(ValueError, match=r"kv_indices must be int32 \[B, H, 3, 6\]"):
        block_mask_from_indices(ref.kv_num_blocks, ref.kv_indices, 3 * 64, 5 * 64 + 1, 64)
    with pytest.raises(ValueError, match=r"kv_num_blocks must be int32 \[2, 3, 4\]"):
        block_mask_from_indices(ref.kv_num_blocks[:, :1], ref.kv_indices, 3 * 64 + 10, 5 * 64 + 1, 64)
