"""The attention call as one compile boundary: the ``dit_accel::attention`` custom op.

Every dit-accel processor (and the ``dit_accel`` dispatcher backend) ends in :func:`attention`. Without
gradients it calls ``torch.ops.dit_accel.attention``, a ``torch.library.custom_op`` whose eager body is
:func:`dit_accel.attention.route.attend`: planning, per-step method state, the kernel and the statistics
record all run there, outside any compiled graph, and ``torch.compile`` sees one opaque call with a fake
(meta) implementation that only gives the output's shape. Transformer blocks therefore compile with
``fullgraph=True``; the blocks around the op are fused as usual.

What names the module inside a graph: dit-accel attaches an :class:`AttentionSite` to each attention module
it patches (the module's attribute ``_dit_accel_site``). The op receives the site's ``key`` (a 0-d int64
CPU tensor) and the context's ``forward_token``, never a Python value that differs between layers, so one
compiled block serves every layer without recompiling (dynamo guards a tensor on its dtype, shape and device,
not on its value). Those are CPU tensors on purpose (the op body reads them without a device sync; a
model's ``.to(device)`` does not move them); inductor therefore leaves CUDA graphs off for graphs holding the
op, whose planning is host work anyway. Processors themselves hold nothing per layer: ``Proc()`` without arguments works (diffusers
rebuilds processors as ``proc.__class__()`` when it loads and unloads IP-Adapters), and a processor on a
module without a site runs dense attention.

Gradients: the sparse kernels have no backward. When gradients are on and q, k or v requires grad the call
runs dense through SDPA outside the op (autograd works), recorded in eager mode with
``dense_reason="grad"``; inside a compiled region it is traced as plain SDPA and not recorded.
"""

from __future__ import annotations

import itertools
import weakref

import torch
import torch.nn.functional as F

from dit_accel.attention.dense import dense_attention
from dit_accel.attention.route import ModuleBinding, attend
from dit_accel.context import TextPosition

SITE_ATTR = "_dit_accel_site"
"""Attribute of a patched attention module holding its :class:`AttentionSite`."""

TEXT_PADDINGS = ("none", "trailing")
"""Values of ``text_padding``: ``"trailing"`` = when the call has a mask, the text tokens (last) may end with
padded keys the mask hides; their count comes from the forward's text mask (HunyuanVideo)."""

FORWARD_TEXT = -1
"""``text_tokens`` value meaning "the text count of the running transformer forward" (FLUX's single-stream
blocks get text and image already joined)."""

_SITE_KEYS = itertools.count(1)
_SITES: "weakref.WeakValueDictionary[int, AttentionSite]" = weakref.WeakValueDictionary()


class AttentionSite:
    """What dit-accel attaches to one attention module: its binding and the tensors that name it in a graph."""

    def __init__(self, binding: ModuleBinding) -> None:
        if not isinstance(binding, ModuleBinding):
            raise TypeError(f"binding must be a ModuleBinding, got {type(binding).__name__}")
        self.binding = binding
        """The module's layer, role, method and transformer context."""
        self.key = torch.tensor(next(_SITE_KEYS), dtype=torch.int64)
        """0-d CPU tensor naming this site in ``dit_accel::attention`` calls."""
        self.token = binding.context.forward_token
        """The context's forward token (the same tensor for every site of one transformer)."""
        _SITES[int(self.key)] = self

    def __repr__(self) -> str:
        b = self.binding
        return f"AttentionSite(module={b.module_name!r}, layer={b.layer}, role={b.role!r}, method={b.method!r})"


def bind_module(module: torch.nn.Module, binding: ModuleBinding) -> AttentionSite:
    """Attach a new :class:`AttentionSite` for ``binding`` to ``module`` (replacing any previous one)."""
    site = AttentionSite(binding)
    setattr(module, SITE_ATTR, site)
    return site


def unbind_module(module: torch.nn.Module) -> None:
    """Detach dit-accel's site from ``module`` (a no-op when it has none)."""
    module.__dict__.pop(SITE_ATTR, None)


def site_of(module: object) -> AttentionSite | None:
    """The :class:`AttentionSite` of an attention module, or ``None`` when dit-accel did not bind it."""
    return getattr(module, SITE_ATTR, None)


def _needs_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def attention(
    site: AttentionSite | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    text_tokens: int = 0,
    text_position: TextPosition = "none",
    text_padding: str = "none",
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention for ``(B, H, S, D)`` inputs, returned as ``(B, S_q, H, D)`` (the layout processors flatten).

    ``site``: the module's site (``None``: dense, as the stock processor). ``text_tokens``/``text_position``:
    the text part of a joint sequence (``text_tokens=FORWARD_TEXT``: the forward's text count);
    ``text_padding``: see :data:`TEXT_PADDINGS`.
    """
    if text_padding not in TEXT_PADDINGS:
        raise ValueError(f"text_padding must be one of {TEXT_PADDINGS}, got {text_padding!r}")
    if site is None:
        return dense_attention(q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale).transpose(1, 2)
    if _needs_grad(q, k, v):
        if torch.compiler.is_compiling():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            ).transpose(1, 2)
        return _attend(site, q, k, v, attn_mask, text_tokens, text_position, text_padding, dropout_p, is_causal, scale).transpose(1, 2)
    return torch.ops.dit_accel.attention(
        q, k, v, attn_mask, site.key, site.token, text_tokens, text_position, text_padding, dropout_p, is_causal, scale
    )


def _attend(
    site: AttentionSite,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    text_tokens: int,
    text_position: str,
    text_padding: str,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """``route.attend`` with the call's text layout resolved from the transformer context; ``(B, H, S, D)`` out."""
    ctx = site.binding.context
    text = ctx.text_tokens if text_tokens == FORWARD_TEXT else text_tokens
    padding = None
    if text_padding == "trailing" and attn_mask is not None and text > 0:
        valid = ctx.text_valid
        if valid and len(set(valid)) == 1 and valid[0] <= text:
            padding = text - valid[0]
    return attend(
        site.binding,
        q,
        k,
        v,
        attn_mask,
        text_tokens=text,
        text_position=text_position,  # type: ignore[arg-type]
        trailing_key_padding=padding,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )


@torch.library.custom_op("dit_accel::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    site_key: torch.Tensor,
    forward_token: torch.Tensor,
    text_tokens: int,
    text_position: str,
    text_padding: str,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """Eager body of ``dit_accel::attention``: the site's ``route.attend``, as a contiguous ``(B, S_q, H, D)``."""
    site = _SITES.get(int(site_key))
    if site is None:
        raise RuntimeError(f"dit_accel::attention: no attention site with key {int(site_key)} (dit-accel was removed)")
    ctx = site.binding.context
    if int(forward_token) != ctx.forward_index:
        # The token is written by the forward's context bookkeeping; a mismatch means this call would plan
        # with the layout and step of another forward.
        raise RuntimeError(
            f"dit_accel::attention on {site.binding.module_name!r} saw forward {int(forward_token)} but its "
            f"transformer context is at forward {ctx.forward_index}"
        )
    out = _attend(site, q, k, v, attn_mask, text_tokens, text_position, text_padding, dropout_p, is_causal, scale)
    return out.transpose(1, 2).to(q.dtype).contiguous()


@_attention_op.register_fake
def _attention_fake(q, k, v, attn_mask, site_key, forward_token, text_tokens, text_position, text_padding, dropout_p, is_causal, scale):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1]))
