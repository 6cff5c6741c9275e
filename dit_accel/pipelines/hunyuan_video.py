"""HunyuanVideo: ``HunyuanVideoTransformer3DModel``.

Dual-stream ``transformer_blocks.i.attn`` and single-stream ``single_transformer_blocks.i.attn`` run
joint attention over ``[video, text]`` (text last) and go through the method. The transformer always
passes a boolean mask that hides padded text tokens at the end; when every batch row has the same
number of valid text tokens (read once per forward from ``encoder_attention_mask``) the call runs
unmasked on the valid tokens and the padded queries are computed densely, which is exactly what the
mask gives; otherwise the call runs dense with the mask. The text token refiner
(``context_embedder.token_refiner...attn``) keeps its stock processor.
"""

from __future__ import annotations

import inspect

from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from dit_accel.attention.processors import DispatcherProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, module_of


class HunyuanVideoDitAccelProcessor(DispatcherProcessorMixin, HunyuanVideoAttnProcessor2_0):
    """``HunyuanVideoAttnProcessor2_0`` with attention routed through dit-accel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        # The padded text count per row comes from the forward's text mask (read with the timestep).
        token = self._publish(attn, text, "last", "trailing")
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        finally:
            self._unpublish(token)


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """``hidden_states`` is ``(B, C, F, H, W)``; text count and valid counts from the text inputs."""
    hs = arg(bound, "hidden_states")
    cfg = module_of(bound).config
    pt, p = int(cfg.patch_size_t), int(cfg.patch_size)
    ehs = arg(bound, "encoder_hidden_states")
    mask = arg(bound, "encoder_attention_mask")
    return ForwardInputs(
        batch_size=hs.shape[0],
        timestep=arg(bound, "timestep"),
        grid=(hs.shape[2] // pt, hs.shape[3] // p, hs.shape[4] // p),
        patch_size=(pt, p, p),
        text_tokens=0 if ehs is None else ehs.shape[1],
        text_valid_tensor=None if mask is None else mask.sum(dim=1),
    )


FAMILY = Family(
    name="hunyuan_video",
    transformer_class="HunyuanVideoTransformer3DModel",
    cfg_style="sequential",
    processor_cls=HunyuanVideoDitAccelProcessor,
    self_attention=r"(single_)?transformer_blocks\.\d+\.attn",
    cross_attention=None,
    read_inputs=read_inputs,
    covers=(
        "sparse: joint [video, text] attention of dual and single blocks (text last; padded text keys removed "
        "when all rows have the same valid length); dense: masks with unequal padding per row; "
        "token refiner keeps its stock processor"
    ),
)
