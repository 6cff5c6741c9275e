"""Public entry point of block-sparse attention: validates inputs and dispatches.

CUDA tensors run the Triton kernel (:mod:`dit_accel.kernels.block_sparse_triton`). CPU tensors run the
torch reference (:mod:`dit_accel.kernels.block_sparse_reference`), unless the process was started with
``TRITON_INTERPRET=1``, in which case they run the Triton kernel in the interpreter (kernel tests).

``precision="fp8"`` runs the 8-bit path (:mod:`dit_accel.kernels.fp8_common`) where
:func:`~dit_accel.kernels.fp8_common.fp8_supported` allows it, and the bf16 path otherwise.
"""

from __future__ import annotations

import os

from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse_common import BlockSparseOutput, check_head_index, check_index, check_inputs
from .block_sparse_reference import block_sparse_attention_reference
from .fp8_common import RECIPES, check_precision, fp8_supported

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
    q_index: Tensor | None = None,
    kv_index: Tensor | None = None,
    precision: str = "bf16",
    head_index: Tensor | None = None,
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
        q_index: optional token permutation of the queries, int32 ``(S_q,)`` or ``(B, H, S_q)`` (B, H may be
            1): permuted query row ``i`` is row ``q_index[..., i]`` of ``q``. The kernel loads q rows
            through it and writes out and LSE rows back to the original positions, so ``out`` and ``lse``
            are in q's own order. The mask and the tile statistics are in the permuted order.
        kv_index: the same for the keys and values (``(S_kv,)`` or ``(B, H, S_kv)``): permuted key ``j`` is
            row ``kv_index[..., j]`` of ``k`` and ``v``. (With it, K/V use the pointer load path, not TMA.)
            With both indices the call equals gathering q, k, v into the permuted order, running without
            indices, and scattering the output back, without materialising the permuted copies.
            Each index must be a permutation; the check syncs once per index tensor (a tensor that passed
            is remembered), so reuse one int32 tensor per order.
        precision: ``"bf16"`` (default) computes in the inputs' own 16-bit dtype; ``"fp8"`` quantises q, k
            (smoothed) and P, V to float8 e4m3 with fine-grained scales and runs the FP8 kernel (about
            5 % relative L2 error against float32 on random inputs, see ``fp8_common``). Where
            ``fp8_supported(q)`` is False (no FP8 tensor cores, CPU without ``TRITON_INTERPRET=1``) an fp8
            request runs the bf16 path; ``fp8_supported`` returns the reason.
        head_index: optional int32 ``(N,)`` strictly ascending flat heads ``b * H + h``: only those heads are
            computed (the grid covers N heads). ``out``, LSE and tile statistics keep their ``(B, H, ...)``
            shapes; the rows of the other heads are unspecified (tile statistics ``-inf``), for the caller to
            fill (the routing layer runs them dense). Validated once per tensor object (one host read).

    Returns:
        ``out`` ``(B, H, S_q, D)`` (dtype of q) when both flags are off; otherwise
        ``BlockSparseOutput(out, lse, tile_stats)`` with None for what was not asked for. A query block
        with no key block gives zeros and LSE ``-inf``.

    Raises:
        ValueError: bad shapes, dtypes, devices, head dims, mask sizes, scale, indices or precision (the
            message names them).
    """
    check_precision(precision)
    view = check_inputs(q, k, v, mask, scale)
    B, H, S_q, _ = q.shape
    q_index = check_index("q_index", q_index, B, H, S_q, q.device)
    kv_index = check_index("kv_index", kv_index, B, H, k.shape[2], q.device)
    head_index = check_head_index(head_index, B, H, q.device)
    if not _use_triton(q):
        return block_sparse_attention_reference(
            q, k, v, mask, scale=view.scale, return_lse=return_lse, tile_stats=tile_stats,
            q_index=q_index, kv_index=kv_index, head_index=head_index,
        )
    if precision != "bf16" and fp8_supported(q)[0]:
        from .block_sparse_fp8_triton import block_sparse_attention_fp8_triton

        return block_sparse_attention_fp8_triton(
            q, k, v, view, recipe=RECIPES[precision], return_lse=return_lse, tile_stats=tile_stats,
            q_index=q_index, kv_index=kv_index, head_index=head_index,
        )
    from .block_sparse_triton import block_sparse_attention_triton

    return block_sparse_attention_triton(
        q, k, v, view, return_lse=return_lse, tile_stats=tile_stats, q_index=q_index, kv_index=kv_index,
        head_index=head_index,
    )
