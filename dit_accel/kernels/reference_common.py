"""Torch helpers shared by the attention references (:mod:`.block_sparse_reference`, :mod:`.fp8_reference`):
rows gathered into and scattered back from a token permutation, and the set of tiles a BlockMask computes."""

from __future__ import annotations

import torch
from torch import Tensor

from .block_sparse_common import MaskView

__all__ = ["block_allowed", "gather_rows", "scatter_rows"]


def _row_index(x: Tensor, index: Tensor) -> Tensor:
    """``index`` ``(S,)`` or ``(B|1, H|1, S)`` as an int64 ``(B, H, S, D)`` index over the rows of ``x``."""
    B, H, _, D = x.shape
    idx = index.long()
    if idx.dim() == 1:
        idx = idx.view(1, 1, -1)
    return idx.expand(B, H, -1).unsqueeze(-1).expand(-1, -1, -1, D)


def gather_rows(x: Tensor, index: Tensor | None) -> Tensor:
    """``x`` ``(B, H, S, D)`` in permuted order: row ``i`` of the result is row ``index[..., i]`` of ``x``."""
    if index is None:
        return x
    return torch.gather(x, 2, _row_index(x, index))


def scatter_rows(x: Tensor, index: Tensor | None) -> Tensor:
    """Inverse of :func:`gather_rows`: row ``index[..., i]`` of the result is row ``i`` of ``x``."""
    if index is None:
        return x
    return torch.empty_like(x).scatter_(2, _row_index(x, index), x)


def block_allowed(view: MaskView, B: int, H: int) -> Tensor:
    """Bool ``(B, H, Q_BLOCKS, KV_BLOCKS)``: which tiles the mask computes (partial and full blocks)."""
    n_kb = view.num_kv_blocks
    allowed = torch.zeros(B, H, view.num_q_blocks, n_kb, dtype=torch.bool, device=view.kv_indices.device)
    pairs = [(view.kv_num_blocks, view.kv_indices)]
    if view.full_kv_num_blocks is not None:
        pairs.append((view.full_kv_num_blocks, view.full_kv_indices))
    for num, idx in pairs:
        num = num.expand(B, H, -1)
        idx = idx.expand(B, H, -1, -1).long()
        listed = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
        # Unlisted slots are padding: route them to an extra column that is dropped afterwards.
        target = torch.where(listed, idx, torch.full_like(idx, n_kb))
        hit = torch.zeros(B, H, view.num_q_blocks, n_kb + 1, dtype=torch.bool, device=idx.device)
        hit.scatter_(-1, target, True)
        allowed |= hit[..., :n_kb]
    return allowed
