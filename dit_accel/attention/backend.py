"""dit-accel as a diffusers attention-dispatcher backend (``"dit_accel"``).

Wan, FLUX.1, LTX-Video and HunyuanVideo processors call ``dispatch_attention_fn(q, k, v, ...,
backend=self._attention_backend, parallel_config=self._parallel_config)``. Our processors for
those families subclass the stock processor, keep its code unchanged, and set
``_attention_backend`` to this backend; their ``__call__`` publishes the module's binding and the
call's text layout in a context variable which the backend function reads. This is also the
plug-in point for diffusers context parallelism (under Ulysses the backend sees the whole sequence
for its heads; see :mod:`dit_accel.parallel.context_parallel`).

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
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _templated_context_parallel_attention,
)

from dit_accel.attention.dense import dense_attention
from dit_accel.attention.route import ModuleBinding, attend
from dit_accel.context import TextPosition
from dit_accel.parallel.context_parallel import SUPPORTED_MODE, require_supported

BACKEND_NAME = "dit_accel"
"""Name of the backend in diffusers' registry (``transformer.set_attention_backend("dit_accel")``)."""


@dataclass(frozen=True)
class ActiveCall:
    """What a processor publishes for the backend during one ``__call__``."""

    binding: ModuleBinding
    """The module being run."""
    text_tokens: int = 0
    """Text tokens in this call's joint sequence."""
    text_position: TextPosition = "none"
    """Where they sit."""
    trailing_key_padding: int | None = None
    """Trailing padded text keys hidden by the call's mask (HunyuanVideo), when the same for all rows."""


ACTIVE_CALL: contextvars.ContextVar[ActiveCall | None] = contextvars.ContextVar("dit_accel_active_call", default=None)


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
    """Route one call (BSHD in and out) through the processor's binding ``active``, or dense without one."""
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
    else:
        out = attend(
            active.binding,
            q,
            k,
            v,
            attn_mask,
            text_tokens=active.text_tokens,
            text_position=active.text_position,
            trailing_key_padding=active.trailing_key_padding,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
        )
    return out.transpose(1, 2)


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
    active = ACTIVE_CALL.get()
    if active is not None and active.text_tokens > 0:
        # Each rank's chunk of a joint sequence is [text, visual] (or [visual, text]); after the all-to-all the text
        # tokens lie in N places along the sequence, which no token layout describes: such calls run dense.
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
        return _attend_bshd(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, ACTIVE_CALL.get())
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
