"""One place that decides, per attention call, between the block-sparse path and the dense path.

Every processor (and the diffusers dispatcher backend) ends in :func:`attend` with ``(B, H, S, D)``
tensors, called from the eager body of the ``dit_accel::attention`` op (:mod:`dit_accel.attention.op`). Dense is used for: cross-attention, calls with an attention mask (except a mask that only
hides trailing padded text keys, which is removed by truncation), gradients (q, k or v requires grad while
grad mode is on), dropout or causal attention,
sequences shorter than the method's ``min_seq_len``, head dims the sparse kernel does not take,
and calls the method declines (``plan`` returned ``None``). A plan runs on the kernel in
:func:`run_plan`, the one place that turns a plan into a kernel call.

Each self-attention call appends one record to the transformer context's statistics; when the tokens
were permuted, its ``token_order`` key says how: ``"forward"`` (the sequence arrived in tile order, the
kernel ran without an index: the fast TMA path), ``"folded"`` (a per-call permutation folded into the
kernel's loads and stores) or ``"forward+folded"`` (both: a k-means order relative to the tile order); no
key when nothing was permuted. With a feature cache installed, ``cache_decision`` is the cache's decision
for the transformer call (``"compute"``, ``"reuse"``, ``"selective"``: on the last two only the blocks
outside the reused span call their attention; ``"probe"`` in the probe blocks before the probe scheduler
decided).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dit_accel.attention.base import AttentionMethod, SparsePlan
from dit_accel.attention.dense import dense_attention, dense_backend_name
from dit_accel.context import AttentionCall, TextPosition, TransformerContext, timed

SPARSE_BACKEND = "block_sparse"
"""Name recorded in statistics for calls that ran on the block-sparse kernel."""


@dataclass(frozen=True)
class ModuleBinding:
    """Immutable facts about one attention module, fixed when processors are built."""

    context: TransformerContext
    """Context of the transformer that owns the module."""
    method: AttentionMethod
    """The attention method for this module's self-attention calls."""
    layer: int
    """Index among the transformer's self-attention modules (cross-attention modules carry their block's index)."""
    module_name: str
    """Dotted module name, e.g. ``blocks.0.attn1``."""
    role: Literal["self", "cross"]
    """``"self"``: self/joint attention over the visual tokens; ``"cross"``: always dense."""
    module_id: int
    """``id()`` of the attention module this binding belongs to (its ``AttentionSite`` is attached to it)."""


def _sparse_head_dim_ok(q: torch.Tensor) -> bool:
    from dit_accel.kernels import SUPPORTED_HEAD_DIMS

    return q.shape[-1] in SUPPORTED_HEAD_DIMS


def block_mask_density_tensor(mask) -> torch.Tensor:
    """Fraction of (query block, key block) tiles computed, as a 0-d tensor (no host sync, unlike
    ``dit_accel.kernels.block_mask_density``); converted to float when statistics are read."""
    kv_blocks = mask.kv_num_blocks.to(torch.float32)
    total = kv_blocks.sum()
    if getattr(mask, "full_kv_num_blocks", None) is not None:
        total = total + mask.full_kv_num_blocks.to(torch.float32).sum()
    q_len, kv_len = mask.seq_lengths
    bq, bk = mask.BLOCK_SIZE
    n_q = -(-q_len // bq)
    n_k = -(-kv_len // bk)
    return total / float(kv_blocks.shape[0] * kv_blocks.shape[1] * n_q * n_k)


def plan_index(plan: SparsePlan, device: torch.device) -> torch.Tensor | None:
    """The kernel's int32 token index of ``plan`` on ``device`` (``None`` without a permutation): the plan's own
    index when it keeps one (a shared order: the same tensor at every call, so the kernel validates it once),
    else ``perm`` converted for this call."""
    if plan.perm is None:
        return None
    if plan.index is not None and plan.index.device == device:
        return plan.index
    return plan.perm.to(device=device, dtype=torch.int32)


def run_plan(
    method: AttentionMethod,
    call: AttentionCall,
    plan: SparsePlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """The block-sparse kernel on ``plan``; a permutation in the plan is passed as the kernel's token index.
    ``plan.perm`` is ``None`` when the sequence already is in the planned order (forward token order)."""
    from dit_accel.kernels import block_sparse_attention

    perm = plan.perm
    if perm is not None and (perm.shape[-1] != q.shape[-2] or perm.dim() not in (1, 3)):
        raise ValueError(
            f"method {method.name!r} returned a permutation of shape {tuple(perm.shape)}; "
            f"expected ({q.shape[-2]},) or (B, H, {q.shape[-2]})"
        )
    # The permutation is folded into the kernel's loads and stores (q_index/kv_index): no permuted
    # copies of q, k, v and no inverse permutation of the output.
    index = plan_index(plan, q.device)
    if method.needs_tile_stats:
        result = block_sparse_attention(q, k, v, plan.mask, scale=scale, tile_stats=True, q_index=index, kv_index=index)
        method.observe(call, result.tile_stats)
        return result.out
    return block_sparse_attention(q, k, v, plan.mask, scale=scale, q_index=index, kv_index=index)


def attend(
    binding: ModuleBinding,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    text_tokens: int = 0,
    text_position: TextPosition = "none",
    trailing_key_padding: int | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention output ``(B, H, S_q, D)`` for ``(B, H, S, D)`` inputs, sparse where allowed.

    ``trailing_key_padding``: when the mask hides exactly the last N keys of every row (padded text
    placed last) the caller passes N; the call then runs unmasked on the first ``S - N`` tokens and
    the N padded queries are computed densely against the valid keys, which is what the mask gives.
    """
    if binding.role == "cross" or q.shape[-2] != k.shape[-2]:
        return dense_attention(q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)

    ctx = binding.context
    seq_len = q.shape[-2]
    reason: str | None = None
    if attn_mask is not None and trailing_key_padding is not None and 0 < trailing_key_padding < seq_len:
        keep = seq_len - trailing_key_padding
        head = attend(
            binding,
            q[:, :, :keep],
            k[:, :, :keep],
            v[:, :, :keep],
            text_tokens=text_tokens - trailing_key_padding,
            text_position=text_position,
            scale=scale,
        )
        tail = dense_attention(q[:, :, keep:], k[:, :, :keep], v[:, :, :keep], scale=scale)
        return torch.cat([head, tail], dim=2)
    if attn_mask is not None and trailing_key_padding == 0:
        attn_mask = None  # the mask hides nothing
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        reason = "grad"  # the block-sparse kernels have no backward; SDPA's autograd gives the true gradient
    elif attn_mask is not None:
        reason = "mask"
    elif dropout_p > 0.0 or is_causal:
        reason = "dropout_or_causal"
    elif seq_len < binding.method.min_seq_len:
        reason = "short_sequence"
    elif not _sparse_head_dim_ok(q):
        reason = "head_dim"

    layout = ctx.layout(seq_len, text_tokens, text_position)
    plan: SparsePlan | None = None
    plan_ms = 0.0
    call: AttentionCall | None = None
    if reason is None:
        call = ctx.attention_call(binding.layer, binding.module_name, layout)
        start = timed()
        result = binding.method.plan(q, k, call)
        plan_ms = timed() - start
        if result is None:
            reason = "method"
        else:
            plan = result if isinstance(result, SparsePlan) else SparsePlan(result)

    token_order = "forward" if layout.tile_order is not None else None
    if plan is not None:
        out = run_plan(binding.method, call, plan, q, k, v, scale)
        if plan.perm is not None:
            token_order = "forward+folded" if token_order == "forward" else "folded"
        density: torch.Tensor | float = block_mask_density_tensor(plan.mask)
        backend = SPARSE_BACKEND
    else:
        out = dense_attention(q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        density = 1.0
        backend = dense_backend_name(q.device)

    branches = ctx.branches
    record = {
        "transformer": ctx.name,
        "call": ctx.clock.call_index,
        "step": ctx.clock.step,
        "num_steps": ctx.clock.num_steps,
        "layer": binding.layer,
        "module": binding.module_name,
        "branch": branches[0] if len(set(branches)) == 1 else ",".join(branches),
        "method": binding.method.name,
        "density": density,
        "plan_ms": plan_ms,
        "backend": backend,
        "dense_reason": reason,
        "seq_len": seq_len,
        "text_tokens": layout.text_tokens,
    }
    if token_order is not None:
        record["token_order"] = token_order
    cache = ctx.cache_status.get(branches[0]) if branches else None
    if cache is not None:
        record["cache_decision"] = cache.decision
    if call is not None:
        # Keys the method added for this call (AttentionCall.add_stats): refresh, skipped tiles, ...
        record.update(call.extra_stats)
    ctx.record(record)
    return out
