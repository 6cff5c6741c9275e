"""Torch reference of block-sparse attention: same signature and results as the Triton kernel.

It is what runs on CPU, and the ground truth of the kernel tests. It materialises the full
``(B, H, S_q, S_kv)`` logits in float32, so it is meant for small shapes. See
:mod:`dit_accel.kernels.block_sparse_common` for the layout and the meaning of LSE and tile stats.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .block_sparse_common import BlockSparseOutput, MaskView, check_head_index, check_index, check_inputs
from .fp8_common import RECIPES, check_precision
from .reference_common import block_allowed, gather_rows, scatter_rows

__all__ = ["block_sparse_attention_reference", "select_heads"]


def _heads_of(t: Tensor, b: Tensor, h: Tensor, B: int, H: int) -> Tensor:
    """Rows ``(b[i], h[i])`` of a ``(B|1, H|1, ...)`` tensor (size-1 dims broadcast) as a ``(1, N, ...)`` tensor."""
    return t.expand(B, H, *t.shape[2:])[b, h].unsqueeze(0)


def select_heads(mask: BlockMask, head_index: Tensor, B: int, H: int) -> BlockMask:
    """The rows of ``mask`` for the flat heads ``head_index`` (``b * H + h``) as a mask of batch 1 and N heads."""
    b, h = head_index.long() // H, head_index.long() % H
    full = mask.full_kv_num_blocks is not None
    return BlockMask.from_kv_blocks(
        _heads_of(mask.kv_num_blocks, b, h, B, H), _heads_of(mask.kv_indices, b, h, B, H),
        _heads_of(mask.full_kv_num_blocks, b, h, B, H) if full else None,
        _heads_of(mask.full_kv_indices, b, h, B, H) if full else None,
        BLOCK_SIZE=mask.BLOCK_SIZE, seq_lengths=tuple(mask.seq_lengths), compute_q_blocks=False,
    )


def _on_heads(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, head_index: Tensor, *, scale: float | None,
              return_lse: bool, tile_stats: bool, q_index: Tensor | None, kv_index: Tensor | None,
              precision: str) -> Tensor | BlockSparseOutput:
    """The reference on the listed heads only (gathered into one batch row), scattered into full-size results."""
    B, H, S_q, D = q.shape
    b, h = head_index.long() // H, head_index.long() % H
    sel = [t[b, h].unsqueeze(0) for t in (q, k, v)]
    idx = [i if i is None or i.dim() == 1 else _heads_of(i, b, h, B, H) for i in (q_index, kv_index)]
    res = block_sparse_attention_reference(
        *sel, select_heads(mask, head_index, B, H), scale=scale, return_lse=return_lse, tile_stats=tile_stats,
        q_index=idx[0], kv_index=idx[1], precision=precision)
    part = res if isinstance(res, Tensor) else res.out
    out = q.new_zeros((B, H, S_q, D))
    out[b, h] = part[0]
    if isinstance(res, Tensor):
        return out
    lse = stats = None
    if res.lse is not None:
        lse = res.lse.new_full((B, H, S_q), float("-inf"))
        lse[b, h] = res.lse[0]
    if res.tile_stats is not None:
        stats = res.tile_stats.new_full((B, H, *res.tile_stats.shape[2:]), float("-inf"))
        stats[b, h] = res.tile_stats[0]
    return BlockSparseOutput(out, lse, stats)


def block_sparse_attention_reference(
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
    """Block-sparse attention in plain torch (float32 math), same contract as ``block_sparse_attention``.

    Args:
        q: ``(B, H, S_q, D)``; k, v: ``(B, H, S_kv, D)``; float16, bfloat16 or float32.
        mask: a FlexAttention ``BlockMask`` with the default ``mask_mod``; B/H of size 1 broadcast.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the per-row log-sum-exp.
        tile_stats: also return the per-tile statistics.
        q_index, kv_index: optional int32 token permutations (see ``block_sparse_attention``): the
            reference gathers q (k, v) into the permuted order, runs there, and scatters out and LSE back.
        precision: ``"bf16"`` computes on the inputs as they are; ``"fp8"`` applies the 8-bit kernel's
            quantisation and arithmetic (:func:`~dit_accel.kernels.fp8_reference.block_sparse_attention_fp8_reference`).
        head_index: optional int32 ``(N,)`` flat heads ``b * H + h`` to compute (see ``block_sparse_attention``);
            the rows of the other heads are zeros (LSE and tile statistics ``-inf``).

    Returns:
        The output tensor, or a :class:`BlockSparseOutput` when ``return_lse`` or ``tile_stats`` is set.
    """
    check_precision(precision)
    if head_index is not None:
        check_inputs(q, k, v, mask, scale)
        head_index = check_head_index(head_index, q.shape[0], q.shape[1], q.device)
        return _on_heads(q, k, v, mask, head_index, scale=scale, return_lse=return_lse, tile_stats=tile_stats,
                         q_index=q_index, kv_index=kv_index, precision=precision)
    if precision != "bf16":
        from .fp8_reference import block_sparse_attention_fp8_reference

        return block_sparse_attention_fp8_reference(
            q, k, v, mask, recipe=RECIPES[precision], scale=scale, return_lse=return_lse, tile_stats=tile_stats,
            q_index=q_index, kv_index=kv_index,
        )
    view = check_inputs(q, k, v, mask, scale)
    B, H, S_q, _ = q.shape
    S_kv = k.shape[2]
    q_index = check_index("q_index", q_index, B, H, S_q, q.device)
    kv_index = check_index("kv_index", kv_index, B, H, S_kv, q.device)
    q = gather_rows(q, q_index)
    k, v = gather_rows(k, kv_index), gather_rows(v, kv_index)
    qbs, kbs = view.q_block, view.kv_block
    allowed = block_allowed(view, B, H)
    tok_allowed = allowed.repeat_interleave(qbs, dim=2).repeat_interleave(kbs, dim=3)[:, :, :S_q, :S_kv]

    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * view.scale
    logits = logits.masked_fill(~tok_allowed, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    empty = torch.isinf(lse) & (lse < 0)
    probs = torch.exp(logits - torch.where(empty, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = scatter_rows(torch.matmul(probs, v.float()).to(q.dtype), q_index)

    stats = None
    if tile_stats:
        n_qb, n_kb = view.num_q_blocks, view.num_kv_blocks
        padded = logits.new_full((B, H, n_qb * qbs, n_kb * kbs), float("-inf"))
        padded[:, :, :S_q, :S_kv] = logits
        tile_max = padded.view(B, H, n_qb, qbs, n_kb, kbs).amax(dim=(3, 5))
        lse_pad = lse.new_full((B, H, n_qb * qbs), float("inf"))
        lse_pad[:, :, :S_q] = lse
        lse_min = lse_pad.view(B, H, n_qb, qbs).amin(dim=-1)
        stats = torch.where(allowed, tile_max - lse_min.unsqueeze(-1), torch.full_like(tile_max, float("-inf")))

    if not (return_lse or tile_stats):
        return out
    if return_lse and q_index is not None:
        lse = scatter_rows(lse.unsqueeze(-1), q_index).squeeze(-1)
    return BlockSparseOutput(out, lse if return_lse else None, stats)
