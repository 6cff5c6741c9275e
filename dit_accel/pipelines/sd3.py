"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel``.

``transformer_blocks.i.attn`` is joint attention over ``[image, text]`` (text last, 333 tokens in the
real model) and goes through the method; SD3.5's extra ``attn2`` (image-only self-attention in the
dual-attention layers) goes through the method too. No cross-attention. The stock
``JointAttnProcessor2_0`` calls SDPA directly, so ``__call__`` restates it with that call replaced.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from dit_accel.attention.op import attention
from dit_accel.attention.processors import DitAccelProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, module_of, split_heads


class SD3DitAccelProcessor(DitAccelProcessorMixin, JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` with its SDPA call routed through dit-accel."""

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        site = self._site(attn)
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = split_heads(query, batch_size, attn.heads, head_dim)
        key = split_heads(key, batch_size, attn.heads, head_dim)
        value = split_heads(value, batch_size, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        text_tokens = 0
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            eq = split_heads(attn.add_q_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ek = split_heads(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            ev = split_heads(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        hidden_states = attention(site, query, key, value, text_tokens=text_tokens, text_position="last")
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """``hidden_states`` is ``(B, C, H, W)``."""
    hs = arg(bound, "hidden_states")
    p = int(module_of(bound).config.patch_size)
    ehs = arg(bound, "encoder_hidden_states")
    return ForwardInputs(
        batch_size=hs.shape[0],
        timestep=arg(bound, "timestep"),
        grid=(1, hs.shape[2] // p, hs.shape[3] // p),
        patch_size=(1, p, p),
        text_tokens=0 if ehs is None else ehs.shape[1],
    )


FAMILY = Family(
    name="sd3",
    transformer_class="SD3Transformer2DModel",
    cfg_style="batched",
    processor_cls=SD3DitAccelProcessor,
    self_attention=r"transformer_blocks\.\d+\.attn2?",
    cross_attention=None,
    read_inputs=read_inputs,
    covers="sparse: joint [image, text] attention (text last) and SD3.5 image-only attn2; no cross-attention",
)
