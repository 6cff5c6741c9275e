"""Shared base of the dit-accel attention processors.

Each family's processor (in ``dit_accel.pipelines.<family>``) subclasses the family's stock
diffusers processor, so projections, norms, RoPE and I2V logic stay the family's own:

* dispatcher families (Wan, FLUX.1, LTX-Video, HunyuanVideo) keep the stock ``__call__``; ours only
  publishes the call (the module's attention site, text layout) for the ``dit_accel`` dispatcher backend
  (:mod:`dit_accel.attention.backend`), which ends in :func:`dit_accel.attention.op.attention`;
* SDPA families (CogVideoX, PixArt-α/Σ, SD3/3.5) call ``F.scaled_dot_product_attention`` directly in
  diffusers, so their ``__call__`` is restated with that single call replaced by ``attention``.

A processor holds nothing per module: what a module's attention needs (layer, method, transformer
context) is the :class:`dit_accel.attention.op.AttentionSite` dit-accel attached to the module. So a
processor is built without arguments, like the stock one (diffusers rebuilds processors as
``proc.__class__()``), one instance may serve every module, and on a module dit-accel did not bind it
computes dense attention like the stock processor.
"""

from __future__ import annotations

import contextvars

from dit_accel.attention.backend import DIT_ACCEL_BACKEND, ActiveCall, publish, unpublish
from dit_accel.attention.op import AttentionSite, site_of
from dit_accel.context import TextPosition


class DitAccelProcessorMixin:
    """Mixin for every dit-accel processor: finds the module's site; holds the diffusers CP attributes."""

    _attention_backend = None
    _parallel_config = None
    _uses_dispatcher = False

    def _site(self, attn: object) -> AttentionSite | None:
        """The attention site of module ``attn`` (``None``: not bound by dit-accel, runs dense)."""
        if self._parallel_config is not None and not self._uses_dispatcher:
            # diffusers' enable_parallelism sets _parallel_config on every processor that declares it;
            # this family computes attention without the dispatcher, so it would only see its shard.
            raise ValueError(
                f"context parallelism is not supported for {type(self).__name__}: "
                "this family does not go through diffusers' attention dispatcher"
            )
        return site_of(attn)


class DispatcherProcessorMixin(DitAccelProcessorMixin):
    """For families whose stock processor calls ``dispatch_attention_fn``: route it to our backend."""

    _attention_backend = DIT_ACCEL_BACKEND
    _uses_dispatcher = True

    def _publish(
        self,
        attn: object,
        text_tokens: int = 0,
        text_position: TextPosition = "none",
        text_padding: str = "none",
    ) -> contextvars.Token | None:
        """Publish this call for the backend; pass the result to :meth:`_unpublish` in a ``finally``."""
        site = self._site(attn)
        return publish(None if site is None else ActiveCall(site, text_tokens, text_position, text_padding))

    @staticmethod
    def _unpublish(token: contextvars.Token | None) -> None:
        unpublish(token)
