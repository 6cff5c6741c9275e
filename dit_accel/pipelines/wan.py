"""Wan 2.1 / 2.2 (T2V, I2V, TI2V): ``WanTransformer3DModel``.

Self-attention ``blocks.i.attn1`` sees video tokens only (no text) and goes through the method;
``blocks.i.attn2`` is text cross-attention (plus Wan I2V's CLIP-image cross-attention inside the same
processor) and runs dense. RoPE, QK-norm and the I2V added-KV branch are the stock processor's.
"""

from __future__ import annotations

import inspect

from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from dit_accel.attention.processors import DispatcherProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, as_triple, module_of


class WanDitAccelProcessor(DispatcherProcessorMixin, WanAttnProcessor):
    """``WanAttnProcessor`` with attention routed through dit-accel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        token = self._publish(attn)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        finally:
            self._unpublish(token)


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """Wan input ``hidden_states`` is ``(B, C, F, H, W)``; tokens follow the Conv3d patch grid."""
    hs = arg(bound, "hidden_states")
    pt, ph, pw = as_triple(module_of(bound).config.patch_size)
    grid = (hs.shape[2] // pt, hs.shape[3] // ph, hs.shape[4] // pw)
    return ForwardInputs(batch_size=hs.shape[0], timestep=arg(bound, "timestep"), grid=grid, patch_size=(pt, ph, pw))


FAMILY = Family(
    name="wan",
    transformer_class="WanTransformer3DModel",
    cfg_style="sequential",
    processor_cls=WanDitAccelProcessor,
    self_attention=r"blocks\.\d+\.attn1",
    cross_attention=r"blocks\.\d+\.attn2",
    read_inputs=read_inputs,
    covers="sparse: blocks.*.attn1 video self-attention; dense: blocks.*.attn2 text (and I2V image) cross-attention",
)
