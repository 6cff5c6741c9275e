"""Public entry point of block-sparse attention: validates inputs and dispatches.

CUDA tensors run the Triton kernel (:mod:`dit_accel.kernels.block_sparse_triton`). CPU tensors run the
torch reference (:mod:`dit_accel.kernels.block_sparse_reference`), unless the process was started with
``TRITON_INTERPRET=1``, in which case they run the Triton kernel in the interpreter (kernel tests).
"""

from __future__ import annotations

import os

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse_common import BlockSparseOutput, check_inputs
from .block_sparse_reference import block_sparse_attention_reference

__all__ = ["block_sparse_attention"]


def _use_triton(q: Tensor) -> bool:
    if q.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    tile_stats: bool = False,
) -> Tensor | BlockSparseOutput:
    """Non-causal attention restricted to the (query block, key block) tiles listed in a BlockMask.

    Args:
        q: ``(B, H, S_q, D)`` float16/bfloat16 (float32 for tests); k, v: ``(B, H, S_kv, D)``, same dtype
            and device; last stride 1. D in (64, 72, 128). Any S (ragged last block).
        mask: ``torch.nn.attention.flex_attention.BlockMask`` with the default ``mask_mod``, block sizes
            64 or 128, ``seq_lengths == (S_q, S_kv)``; its B/H may be 1 (broadcast). Build it with
            ``dense_block_mask``, ``block_mask_from_bool`` or ``block_mask_from_scores``.
        scale: softmax scale (> 0), default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp per row, ``(B, H, S_q)`` float32, natural log.
        tile_stats: also return ``(B, H, Q_BLOCKS, KV_BLOCKS)`` float32 tile statistics: for each computed
            tile ``max logit - min LSE of the block's rows`` (log upper bound of the tile's largest
            probability), ``-inf`` for tiles not computed.

    Returns:
        ``out`` ``(B, H, S_q, D)`` (dtype of q) when both flags are off; otherwise
        ``BlockSparseOutput(out, lse, tile_stats)`` with None for what was not asked for. A query block
        with no key block gives zeros and LSE ``-inf``.

    Raises:
        ValueError: bad shapes, dtypes, devices, head dims, mask sizes or scale (the message names them).
    """
    view = check_inputs(q, k, v, mask, scale)
    if not _use_triton(q):
        return block_sparse_attention_reference(
            q, k, v, mask, scale=view.scale, return_lse=return_lse, tile_stats=tile_stats
        )
    from .block_sparse_triton import block_sparse_attention_triton

    return block_sparse_attention_triton(q, k, v, view, return_lse=return_lse, tile_stats=tile_stats)
