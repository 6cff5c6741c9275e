"""CogVideoX 1.0 / 1.5: ``CogVideoXTransformer3DModel``.

``transformer_blocks.i.attn1`` is joint attention over ``[text, video]`` (text first, 226 tokens in
the real model) and goes through the method. No cross-attention. The stock processor calls
``F.scaled_dot_product_attention`` directly, so ``__call__`` restates it with that call replaced.
Video tokens: 1.0 per-frame 2x2 patches ``(f, h, w)``; 1.5 ``(f/2, h/2, w/2)`` with ``patch_size_t=2``.
"""

from __future__ import annotations

import inspect

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

from dit_accel.attention.op import attention
from dit_accel.attention.processors import DitAccelProcessorMixin
from dit_accel.context import ForwardInputs
from dit_accel.pipelines.base import Family, arg, module_of, split_heads


class CogVideoXDitAccelProcessor(DitAccelProcessorMixin, CogVideoXAttnProcessor2_0):
    """``CogVideoXAttnProcessor2_0`` with its SDPA call routed through dit-accel."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        site = self._site(attn)
        text_seq_length = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

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

        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_seq_length:] = apply_rotary_emb(query[:, :, text_seq_length:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_seq_length:] = apply_rotary_emb(key[:, :, text_seq_length:], image_rotary_emb)

        hidden_states = attention(
            site, query, key, value, attention_mask, text_tokens=text_seq_length, text_position="first"
        )
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def read_inputs(bound: inspect.BoundArguments) -> ForwardInputs:
    """``hidden_states`` is ``(B, F, C, H, W)``."""
    hs = arg(bound, "hidden_states")
    cfg = module_of(bound).config
    p = int(cfg.patch_size)
    pt = int(cfg.patch_size_t) if cfg.patch_size_t is not None else 1
    ehs = arg(bound, "encoder_hidden_states")
    return ForwardInputs(
        batch_size=hs.shape[0],
        timestep=arg(bound, "timestep"),
        grid=(hs.shape[1] // pt, hs.shape[3] // p, hs.shape[4] // p),
        patch_size=(pt, p, p),
        text_tokens=0 if ehs is None else ehs.shape[1],
    )


FAMILY = Family(
    name="cogvideox",
    transformer_class="CogVideoXTransformer3DModel",
    cfg_style="batched",
    processor_cls=CogVideoXDitAccelProcessor,
    self_attention=r"transformer_blocks\.\d+\.attn1",
    cross_attention=None,
    read_inputs=read_inputs,
    covers="sparse: transformer_blocks.*.attn1 joint [text, video] attention (text first); no cross-attention",
)
