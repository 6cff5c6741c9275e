"""PixArt-α / PixArt-Σ: ``PixArtTransformer2DModel``.

``transformer_blocks.i.attn1`` is image self-attention and goes through the method;
``transformer_blocks.i.attn2`` is text cross-attention with the T5 padding mask and runs dense.
The stock ``AttnProcessor2_0`` calls SDPA directly, so ``__call__`` restates it with that call replaced.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import deprecate

from dit_accel.attention.op import attention
from dit_accel.attention.processors import DitAccelProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, module_of, split_heads


class PixArtDitAccelProcessor(DitAccelProcessorMixin, AttnProcessor2_0):
    """``AttnProcessor2_0`` (as used by PixArt) with its SDPA call routed through dit-accel."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        site = self._site(attn)
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored.")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = split_heads(query, batch_size, attn.heads, head_dim)
        key = split_heads(key, batch_size, attn.heads, head_dim)
        value = split_heads(value, batch_size, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = attention(site, query, key, value, attention_mask)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """``hidden_states`` is ``(B, C, H, W)``."""
    hs = arg(bound, "hidden_states")
    p = int(module_of(bound).config.patch_size)
    return ForwardInputs(
        batch_size=hs.shape[0],
        timestep=arg(bound, "timestep"),
        grid=(1, hs.shape[2] // p, hs.shape[3] // p),
        patch_size=(1, p, p),
    )


FAMILY = Family(
    name="pixart",
    transformer_class="PixArtTransformer2DModel",
    cfg_style="batched",
    processor_cls=PixArtDitAccelProcessor,
    self_attention=r"transformer_blocks\.\d+\.attn1",
    cross_attention=r"transformer_blocks\.\d+\.attn2",
    read_inputs=read_inputs,
    covers="sparse: transformer_blocks.*.attn1 image self-attention; dense: attn2 masked text cross-attention",
)
