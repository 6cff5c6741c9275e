"""dit-accel as a diffusers attention-dispatcher backend (``"dit_accel"``).

Wan, FLUX.1, LTX-Video and HunyuanVideo processors call ``dispatch_attention_fn(q, k, v, ...,
backend=self._attention_backend, parallel_config=self._parallel_config)``. Our processors for
those families subclass the stock processor, keep its code unchanged, and set
``_attention_backend`` to this backend; their ``__call__`` publishes the module's attention site and the
call's text layout (:func:`publish`), which the backend function reads. This is also the
plug-in point for diffusers context parallelism (under Ulysses the backend sees the whole
sequence for its heads; see :mod:`dit_accel.parallel.context_parallel`).

Publishing: in eager mode through a context variable (safe across threads and async tasks). Dynamo cannot
trace context variables, so while a compiled region is traced the call goes on a plain list that only
exists at trace time: the processor pushes and pops it around the stock ``__call__`` within one traced
frame, so the compiled code never touches it and the site's tensors flow straight into the
``dit_accel::attention`` op. Inside a ``torch.cond`` branch (the compiled feature cache wraps each block in
one, :mod:`dit_accel.caching.compiled`) dynamo refuses any change to an object made outside the branch; the
push and its pop happen in the same branch and leave nothing behind, so that check is lifted for them.

How it is registered: diffusers' ``AttentionBackendName`` is a closed ``str`` enum and
``_AttentionBackendRegistry`` is private. We add one member to the enum in place (the pattern
cache-dit uses) and register the function with ``_AttentionBackendRegistry.register``. Limits:
private API, so it is feature-checked at import and pinned by ``diffusers>=0.42.1,<0.43``;
the backend supports diffusers' Ulysses context parallelism (after the all-to-all each rank
holds the whole sequence for a subset of heads, so token layouts and block masks stay global;
joint text+visual calls (FLUX, HunyuanVideo) run dense there, their text tokens being spread over
the gathered sequence);
ring attention (``ring_degree > 1``, also Ulysses+ring) is refused with a clear error naming the
supported mode, because each ring step sees only a chunk of the keys, which a block-sparse plan over
the whole token grid cannot be split into;
``transformer.set_attention_backend("dit_accel")`` works (on every dispatcher module, where calls
without a dit-accel processor run dense), and ``set_attention_backend(<other>)`` after
``dit_accel.apply`` replaces ours on those processors (then everything runs on that backend).
"""

from __future__ import annotations

import contextvars
from typing import Any, NamedTuple

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _templated_context_parallel_attention,
)

from dit_accel.attention.dense import dense_attention
from dit_accel.attention.op import AttentionSite, attention
from dit_accel.context import TextPosition
from dit_accel.parallel.context_parallel import SUPPORTED_MODE, require_supported

BACKEND_NAME = "dit_accel"
"""Name of the backend in diffusers' registry (``transformer.set_attention_backend("dit_accel")``)."""


class ActiveCall(NamedTuple):
    """What a processor publishes for the backend during one ``__call__``."""

    site: AttentionSite
    """The attention site of the module being run."""
    text_tokens: int = 0
    """Text tokens in this call's joint sequence (``op.FORWARD_TEXT``: the forward's text count)."""
    text_position: TextPosition = "none"
    """Where they sit."""
    text_padding: str = "none"
    """``"trailing"`` when padded text keys at the end may be hidden by the call's mask (HunyuanVideo)."""


ACTIVE_CALL: contextvars.ContextVar[ActiveCall | None] = contextvars.ContextVar("dit_accel_active_call", default=None)
_TRACED_CALLS: list[ActiveCall | None] = []


def _traced_stack_change(change: Any, *args: Any) -> None:
    """Apply ``change`` to the trace-time call list, also inside a ``torch.cond`` branch (see the module doc)."""
    lift = getattr(torch._dynamo.utils, "_disable_side_effect_safety_checks_for_current_subtracer", None)
    if lift is None:  # torch without it: the list still works outside higher-order ops
        change(*args)
    else:
        lift(change, *args)


def publish(call: ActiveCall | None) -> contextvars.Token | None:
    """Make ``call`` the active call until :func:`unpublish` with the returned token (``None``: run dense)."""
    if torch.compiler.is_compiling():
        _traced_stack_change(_TRACED_CALLS.append, call)
        return None
    return ACTIVE_CALL.set(call)


def unpublish(token: contextvars.Token | None) -> None:
    """End the call :func:`publish` started."""
    if torch.compiler.is_compiling():
        _traced_stack_change(_TRACED_CALLS.pop)
    elif token is not None:
        ACTIVE_CALL.reset(token)


def active_call() -> ActiveCall | None:
    """The call published by the processor running now, or ``None``."""
    if torch.compiler.is_compiling():
        return _TRACED_CALLS[-1] if _TRACED_CALLS else None
    return ACTIVE_CALL.get()


def _extend_enum(name: str) -> AttentionBackendName:
    if name in AttentionBackendName._value2member_map_:
        return AttentionBackendName._value2member_map_[name]
    member = str.__new__(AttentionBackendName, name)
    member._name_ = name.upper()
    member._value_ = name
    # setattr must come before the _member_map_ insertion: EnumType.__setattr__ refuses to
    # reassign an existing member name.
    setattr(AttentionBackendName, name.upper(), member)
    AttentionBackendName._member_map_[name.upper()] = member
    AttentionBackendName._member_names_.append(name.upper())
    AttentionBackendName._value2member_map_[name] = member
    return member


def _attend_bshd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    active: ActiveCall | None,
) -> torch.Tensor:
    """Route one call (BSHD in and out) through the published site of ``active``, or dense without one."""
    if (
        attn_mask is not None
        and attn_mask.ndim == 2
        and attn_mask.shape[0] == query.shape[0]
        and attn_mask.shape[1] == key.shape[1]
    ):
        attn_mask = attn_mask[:, None, None, :]  # same 2-D mask convention as diffusers' native backend
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if active is None or enable_gqa:
        out = dense_attention(q, k, v, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return out.transpose(1, 2)
    return attention(
        active.site,
        q,
        k,
        v,
        attn_mask,
        text_tokens=active.text_tokens,
        text_position=active.text_position,
        text_padding=active.text_padding,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )


def _context_parallel_forward_op(
    ctx: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: Any | None = None,
) -> torch.Tensor:
    """diffusers' templated-CP ``forward_op``: under Ulysses it sees the full sequence for its heads."""
    if return_lse:
        # Ulysses never asks for it; ring attention does, and is refused before reaching here.
        raise ValueError(f"the dit_accel attention backend does not return LSE; supported context parallelism: {SUPPORTED_MODE}")
    active = active_call()
    if active is not None and active.text_tokens != 0:
        # Each rank's chunk of a joint sequence is [text, visual] (or [visual, text]); after the all-to-all the text
        # tokens lie in N places along the sequence, which no token layout describes: such calls run dense
        # (``op.FORWARD_TEXT``, a negative count, stands for the forward's text tokens).
        active = None
    return _attend_bshd(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, active)


def _context_parallel_backward_op(*args: Any, **kwargs: Any) -> None:
    """Inference only: no gradients through the dit_accel backend."""
    raise NotImplementedError("the dit_accel attention backend is inference-only (no backward)")


def _dit_accel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config: Any | None = None,
) -> torch.Tensor:
    """Backend function: BSHD in, BSHD out (diffusers' dispatcher layout)."""
    if return_lse:
        raise ValueError("the dit_accel attention backend does not return LSE (return_lse=True given)")
    if _parallel_config is None or _parallel_config.context_parallel_config is None:
        return _attend_bshd(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, active_call())
    require_supported(_parallel_config.context_parallel_config)
    return _templated_context_parallel_attention(
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
        enable_gqa,
        return_lse,
        forward_op=_context_parallel_forward_op,
        backward_op=_context_parallel_backward_op,
        _parallel_config=_parallel_config,
    )


def register_backend() -> AttentionBackendName:
    """Register (once) and return the ``dit_accel`` member of diffusers' ``AttentionBackendName``."""
    member = _extend_enum(BACKEND_NAME)
    if member not in _AttentionBackendRegistry._backends:
        _AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(
            _dit_accel_attention
        )
    return member


DIT_ACCEL_BACKEND: AttentionBackendName = register_backend()
"""The registered backend member; dispatcher-family processors default to it."""
