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

Break-even routing (:func:`run_plan`, the method's ``dense_above``; the split: :mod:`dit_accel.attention.head_split`,
the precision: :mod:`dit_accel.attention.precision`): when a plan is made, each (batch row, head)
whose planned block density is above the break-even density runs dense attention, the other heads run the
kernel on a head subset (``head_index``), into one output. The split is kept until the next fresh plan (a reuse
stage's calls reuse it), so reading the densities costs one host synchronisation per plan. The record of a split
call holds ``dense_heads`` (flat ``b * H + h`` of the heads run dense), ``heads``, ``break_even`` and
``cost_source`` (``"fixed"``, or where the cost table came from: ``"measured"``, ``"cache"``, ``"shipped"``);
a call whose every head is above break-even runs dense with ``dense_reason`` ``"break_even"``. A method's fp8
``precision`` that the device cannot run falls back to bf16 with ``precision_fallback`` saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dit_accel.attention.base import AttentionMethod, SparsePlan
from dit_accel.attention.dense import dense_attention, dense_call_backend
from dit_accel.attention.head_split import block_mask_density_tensor, head_split
from dit_accel.attention.precision import kernel_precision, reference_runs
from dit_accel.context import AttentionCall, TextPosition, TransformerContext, timed
from dit_accel.kernels.block_sparse_common import SUPPORTED_HEAD_DIMS

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
    """``plan`` executed: the block-sparse kernel on the heads below break-even (a permutation in the plan is passed
    as the kernel's token index; ``plan.perm`` is ``None`` when the sequence already is in the planned order),
    dense attention on the others (see the module docstring), in the method's precision."""
    from dit_accel.kernels import block_sparse_attention, block_sparse_attention_reference

    perm = plan.perm
    if perm is not None and (perm.shape[-1] != q.shape[-2] or perm.dim() not in (1, 3)):
        raise ValueError(
            f"method {method.name!r} returned a permutation of shape {tuple(perm.shape)}; "
            f"expected ({q.shape[-2]},) or (B, H, {q.shape[-2]})"
        )
    precision, fallback = kernel_precision(q, method.precision)
    if method.precision != "bf16":
        call.add_stats(precision=precision)
        if fallback is not None:
            call.add_stats(precision_fallback=fallback)
    split = head_split(method, call, plan, q, precision)
    if split is not None and split.all_dense:
        call.add_stats(backend=dense_call_backend(q, k), dense_reason="break_even")
        return dense_attention(q, k, v, scale=scale)
    # On CPU an fp8 request runs the torch reference of the 8-bit arithmetic (the public entry runs bf16 there).
    kernel = block_sparse_attention_reference if precision != "bf16" and reference_runs(q) else block_sparse_attention
    # The permutation is folded into the kernel's loads and stores (q_index/kv_index): no permuted
    # copies of q, k, v and no inverse permutation of the output.
    index = plan_index(plan, q.device)
    heads = None if split is None else split.sparse_index
    if method.needs_tile_stats:
        result = kernel(q, k, v, plan.mask, scale=scale, tile_stats=True, q_index=index, kv_index=index,
                        precision=precision, head_index=heads)
        # the dense heads' tile statistics are -inf (not computed): they never join a skip list
        method.observe(call, result.tile_stats)
        out = result.out
    else:
        out = kernel(q, k, v, plan.mask, scale=scale, q_index=index, kv_index=index, precision=precision,
                     head_index=heads)
    if heads is not None:
        b, h = split.dense_rows
        # the dense heads gathered once into a batch of one: the only copies beyond the output
        out[b, h] = dense_attention(q[b, h].unsqueeze(0), k[b, h].unsqueeze(0), v[b, h].unsqueeze(0), scale=scale)[0]
        call.add_stats(backend=f"{SPARSE_BACKEND}+{dense_call_backend(q, k)}")
    return out


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
    method = binding.method
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        reason = "grad"  # the block-sparse kernels have no backward; SDPA's autograd gives the true gradient
    elif attn_mask is not None:
        reason = "mask"
    elif dropout_p > 0.0 or is_causal:
        reason = "dropout_or_causal"
    elif seq_len < method.min_seq_len:
        reason = "short_sequence"
    elif q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        reason = "head_dim"
    elif not method.plans:
        reason = "method"

    stats = ctx.stats_enabled
    if reason is None or stats:
        layout = ctx.layout(seq_len, text_tokens, text_position)
    plan: SparsePlan | None = None
    plan_ms = 0.0
    call: AttentionCall | None = None
    if reason is None:
        call = ctx.attention_call(binding.layer, binding.module_name, layout)
        start = timed()
        result = method.plan(q, k, call)
        plan_ms = timed() - start
        if result is None:
            reason = "method"
        else:
            plan = result if isinstance(result, SparsePlan) else SparsePlan(result)

    if plan is not None:
        out = run_plan(method, call, plan, q, k, v, scale)
    else:
        out = dense_attention(q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    if not stats:
        return out

    # the statistics record: built only while statistics are on (it is host work on every call)
    token_order = "forward" if layout.tile_order is not None else None
    if plan is not None:
        if plan.perm is not None:
            token_order = "forward+folded" if token_order == "forward" else "folded"
        density: torch.Tensor | float = block_mask_density_tensor(plan.mask)
        backend = SPARSE_BACKEND
    else:
        density = 1.0
        backend = dense_call_backend(q, k, attn_mask)
    branches = ctx.branches
    record = {
        "transformer": ctx.name,
        "call": ctx.clock.call_index,
        "step": ctx.clock.step,
        "num_steps": ctx.clock.num_steps,
        "layer": binding.layer,
        "module": binding.module_name,
        "branch": branches[0] if len(set(branches)) == 1 else ",".join(branches),
        "method": method.name,
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
