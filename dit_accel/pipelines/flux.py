"""FLUX.1: ``FluxTransformer2DModel``.

Both dual-stream (``transformer_blocks.i.attn``: image and text projected separately, joined as
``[text, image]``) and single-stream blocks (``single_transformer_blocks.i.attn``: already joined)
run joint attention over ``[text, image]`` and go through the method, with the text count and
position (first) in the layout. No cross-attention. Image tokens are the 2x2-packed latents,
row-major; the grid is read from ``img_ids``.
"""

from __future__ import annotations

import inspect

from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from dit_accel.attention.op import FORWARD_TEXT
from dit_accel.attention.processors import DispatcherProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, module_of


class FluxDitAccelProcessor(DispatcherProcessorMixin, FluxAttnProcessor):
    """``FluxAttnProcessor`` with attention routed through dit-accel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        # Single-stream blocks get text already joined in front; its count comes from the forward.
        text = FORWARD_TEXT if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        token = self._publish(attn, text, "first")
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            self._unpublish(token)


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """``hidden_states`` is packed ``(B, S_img, C)``; ``img_ids[..., 0:3]`` = (frame, row, col) per token."""
    hs = arg(bound, "hidden_states")
    ehs = arg(bound, "encoder_hidden_states")
    ids = arg(bound, "img_ids")
    p = int(module_of(bound).config.patch_size)
    grid_tensor = ids.reshape(-1, ids.shape[-1])[:, :3].amax(dim=0) if ids is not None else None
    return ForwardInputs(
        batch_size=hs.shape[0],
        timestep=arg(bound, "timestep"),
        grid=None,
        patch_size=(1, 2 * p, 2 * p),
        text_tokens=0 if ehs is None else ehs.shape[1],
        grid_tensor=grid_tensor,
    )


FAMILY = Family(
    name="flux",
    transformer_class="FluxTransformer2DModel",
    cfg_style="sequential",
    processor_cls=FluxDitAccelProcessor,
    self_attention=r"(single_)?transformer_blocks\.\d+\.attn",
    cross_attention=None,
    read_inputs=read_inputs,
    covers="sparse: joint [text, image] attention of dual and single blocks (text first); no cross-attention",
)
