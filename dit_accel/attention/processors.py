"""Shared base of the dit-accel attention processors.

Each family's processor (in ``dit_accel.pipelines.<family>``) subclasses the family's stock
diffusers processor, so projections, norms, RoPE and I2V logic stay the family's own:

* dispatcher families (Wan, FLUX.1, LTX-Video, HunyuanVideo) keep the stock ``__call__``; ours only
  publishes the call (module binding, text layout) in :data:`dit_accel.attention.backend.ACTIVE_CALL`
  and sets ``_attention_backend`` to the ``dit_accel`` dispatcher backend, which ends in
  :func:`dit_accel.attention.route.attend`;
* SDPA families (CogVideoX, PixArt-α/Σ, SD3/3.5) call ``F.scaled_dot_product_attention`` directly in
  diffusers, so their ``__call__`` is restated with that single call replaced by ``attend``.

A processor holds only immutable facts about its module (:class:`ModuleBinding`); all mutable
state lives in the transformer's context.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from dit_accel.attention.backend import ACTIVE_CALL, DIT_ACCEL_BACKEND, ActiveCall
from dit_accel.attention.route import ModuleBinding
from dit_accel.context import TextPosition


class DitAccelProcessorMixin:
    """Mixin for every dit-accel processor: holds the module binding and the diffusers CP attributes."""

    _attention_backend = None
    _parallel_config = None
    _uses_dispatcher = False

    def _bind(self, binding: ModuleBinding) -> None:
        if not isinstance(binding, ModuleBinding):
            raise TypeError(f"binding must be a ModuleBinding, got {type(binding).__name__}")
        self.binding = binding

    def _check_module(self, attn: object) -> None:
        # A processor carries its module's layer index and its transformer's context; used on any
        # other module (e.g. one instance passed to set_attn_processor for all layers) it would
        # mix up per-layer state and layouts, so refuse instead of computing something wrong.
        if id(attn) != self.binding.module_id:
            raise RuntimeError(
                f"{type(self).__name__} was built for module {self.binding.module_name!r} and cannot run on "
                "another attention module; use dit_accel.processors_for(transformer) (a dict with one processor "
                "per module) for transformer.set_attn_processor(...)"
            )
        if self._parallel_config is not None and not self._uses_dispatcher:
            # diffusers' enable_parallelism sets _parallel_config on every processor that declares it;
            # this family computes attention without the dispatcher, so it would only see its shard.
            raise ValueError(
                f"context parallelism is not supported for {type(self).__name__} (module {self.binding.module_name!r}): "
                "this family does not go through diffusers' attention dispatcher"
            )

    @property
    def method_name(self) -> str:
        """Name of the attention method this processor runs on self-attention."""
        return self.binding.method.name

    def __repr__(self) -> str:
        b = self.binding
        return f"{type(self).__name__}(module={b.module_name!r}, layer={b.layer}, role={b.role!r}, method={b.method!r})"


class DispatcherProcessorMixin(DitAccelProcessorMixin):
    """For families whose stock processor calls ``dispatch_attention_fn``: route it to our backend."""

    _attention_backend = DIT_ACCEL_BACKEND
    _uses_dispatcher = True

    @contextlib.contextmanager
    def _publish(
        self,
        attn: object,
        text_tokens: int = 0,
        text_position: TextPosition = "none",
        trailing_key_padding: int | None = None,
    ) -> Iterator[None]:
        self._check_module(attn)
        token = ACTIVE_CALL.set(ActiveCall(self.binding, text_tokens, text_position, trailing_key_padding))
        try:
            yield
        finally:
            ACTIVE_CALL.reset(token)
