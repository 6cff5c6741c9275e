"""The testbed DiT: a small diffusers `WanTransformer3DModel`, so the Wan processor path runs on it.

Shapes (the shipped configuration):
    latent video (B, 8, T, H/4, W/4) -> patch (1, 2, 2) -> (T * H/8 * W/8) tokens of width 384,
    6 heads of dim 64, 6 blocks with ffn 3x (13.8 M parameters; 4x would push the shipped
weights past 40 MB), cross-attention to the testbed text encoder (width 256).
At 256x256 px x 16 frames that is 32x32 tokens x 16 frames = 16,384 tokens; at the CPU size
128x128 px x 8 frames, 2,048 tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel


def transformer_config(
    *,
    in_channels: int = 8,
    text_dim: int = 256,
    num_layers: int = 6,
    num_heads: int = 6,
    head_dim: int = 64,
    ffn_mult: int = 3,
) -> dict[str, Any]:
    """The `WanTransformer3DModel` config dict of the testbed DiT (defaults: the shipped model)."""
    dim = num_heads * head_dim
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": num_heads,
        "attention_head_dim": head_dim,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "text_dim": text_dim,
        "freq_dim": 256,
        "ffn_dim": ffn_mult * dim,
        "num_layers": num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }


def build_transformer(config: dict[str, Any]) -> WanTransformer3DModel:
    """A freshly initialised testbed DiT for training.

    DiT-style init (Peebles & Xie): Xavier-uniform linears, and zeros for the output projection and
    the timestep-to-modulation projection, so the untrained model predicts 0 and each block starts
    from its learned `scale_shift_table` alone. This trains faster than diffusers' default init.
    """
    model = WanTransformer3DModel.from_config(config)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    nn.init.zeros_(model.condition_embedder.time_proj.weight)
    nn.init.zeros_(model.condition_embedder.time_proj.bias)
    # The timestep MLP keeps a small normal init so the modulation can start to depend on t.
    for lin in (model.condition_embedder.time_embedder.linear_1, model.condition_embedder.time_embedder.linear_2):
        nn.init.normal_(lin.weight, std=0.02)
    return model


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
