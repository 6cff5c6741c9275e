"""LTX-Video: ``LTXVideoTransformer3DModel``.

Self-attention ``transformer_blocks.i.attn1`` sees video tokens only and goes through the method;
``attn2`` is text cross-attention with a padding mask and runs dense. The pipeline packs the latents
before the transformer; the token grid comes from the forward's ``num_frames/height/width``.
"""

from __future__ import annotations

import inspect

from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

from dit_accel.attention.processors import DispatcherProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, module_of


class LTXVideoDitAccelProcessor(DispatcherProcessorMixin, LTXVideoAttnProcessor):
    """``LTXVideoAttnProcessor`` with attention routed through dit-accel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        token = self._publish(attn)
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            self._unpublish(token)


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """``hidden_states`` is packed ``(B, S, C)``; ``num_frames/height/width`` give the latent grid."""
    hs = arg(bound, "hidden_states")
    cfg = module_of(bound).config
    pt, p = int(cfg.patch_size_t), int(cfg.patch_size)
    nf, h, w = arg(bound, "num_frames"), arg(bound, "height"), arg(bound, "width")
    grid = None
    if nf is not None and h is not None and w is not None:
        nf, h, w = int(nf), int(h), int(w)
        grid = (nf, h, w) if nf * h * w == hs.shape[1] else (nf // pt, h // p, w // p)
    return ForwardInputs(batch_size=hs.shape[0], timestep=arg(bound, "timestep"), grid=grid, patch_size=(pt, p, p))


FAMILY = Family(
    name="ltx_video",
    transformer_class="LTXVideoTransformer3DModel",
    cfg_style="batched",
    processor_cls=LTXVideoDitAccelProcessor,
    self_attention=r"transformer_blocks\.\d+\.attn1",
    cross_attention=r"transformer_blocks\.\d+\.attn2",
    read_inputs=read_inputs,
    covers="sparse: transformer_blocks.*.attn1 video self-attention; dense: attn2 masked text cross-attention",
)
