"""Shared helpers of the sparse-method tests: a tiny testbed pipeline, hand-driven contexts, masks as bools."""

from __future__ import annotations

import torch

from dit_accel.context import AttentionCall, StepClock, TransformerContext
from dit_accel.testbed import captions
from dit_accel.testbed import pipeline as pipeline_module
from dit_accel.testbed.model import transformer_config

CAPTION = "a small red circle moving left on a striped background"

FULL = dict(top_p=1.0, similarity_threshold=-1.0, dense_warmup=0.0, dense_first_layers=0, dense_last_step=False,
            min_seq_len=0, dense_above=1.0)
"""Options that make the draft-based methods keep every block and turn the safety valves and the break-even
routing off (no planned density is above 1.0: every planned head runs the kernel)."""


def tiny_testbed(num_layers: int = 3) -> pipeline_module.TestbedPipeline:
    """A random-weight testbed pipeline with head dim 64 (the sparse path's), 2 heads."""
    torch.manual_seed(0)
    pipe = pipeline_module.build_pipeline(
        captions.VOCAB,
        transformer_config=transformer_config(num_layers=num_layers, num_heads=2, head_dim=64, text_dim=32, in_channels=4),
        autoencoder_config={"z_dim": 4, "block_channels": (8, 16, 16), "norm_groups": 4},
        text_encoder_config={"width": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 1},
    )
    with torch.no_grad():  # the training init zeroes these; give the model an output
        for lin in (pipe.transformer.proj_out, pipe.transformer.condition_embedder.time_proj):
            lin.weight.normal_(std=0.05)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, steps: int = 4, caption: str = CAPTION) -> torch.Tensor:
    """Final latents of one CFG generation at 128x128 px x 4 frames: grid (4, 16, 16) = 1,024 tokens, 8 blocks."""
    return pipe(caption, num_frames=4, height=128, width=128, num_inference_steps=steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).frames


def hand_context(grid=(4, 16, 16), num_steps: int | None = 10) -> TransformerContext:
    """A transformer context driven by hand (no model): grid set, sequential CFG."""
    clock = StepClock(num_steps_fn=lambda: num_steps)
    ctx = TransformerContext(torch.nn.Linear(1, 1), "wan", "transformer", clock, "sequential")
    ctx.grid = grid
    return ctx


def call_at(ctx: TransformerContext, step: int, seq_len: int, layer: int = 1, branch: str = "cond",
            text_tokens: int = 0, text_position: str = "none", batch: int = 1) -> AttentionCall:
    """The ``AttentionCall`` of one self-attention call at denoising ``step`` (timesteps decrease)."""
    ctx.clock.observe(float(1000 - step))
    ctx.branches = (branch,) * batch
    layout = ctx.layout(seq_len, text_tokens, text_position)
    return ctx.attention_call(layer, f"blocks.{layer}.attn1", layout)


def smooth_qk(grid=(4, 16, 16), heads: int = 2, dim: int = 64, seed: int = 0, noise: float = 0.3):
    """q, k ``(1, H, S, D)`` shaped like video attention: smooth random fields over the grid plus noise,
    so nearby tokens attend to each other and the draft map has structure."""
    g = torch.Generator().manual_seed(seed)
    F, H, W = grid
    coarse = torch.randn(2, heads * dim, max(1, F // 2), max(1, H // 4), max(1, W // 4), generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(F, H, W), mode="trilinear", align_corners=False)
    field = field.view(2, heads, dim, F * H * W).permute(0, 1, 3, 2)
    x = field + noise * torch.randn(field.shape, generator=g)
    q, k = 3.0 * x[0:1], 3.0 * x[1:2]
    return q.contiguous(), k.contiguous()


def mask_bool(mask) -> torch.Tensor:
    """Bool ``(B, H, QB, KB)`` of the tiles a BlockMask (or the mask of a plan) computes."""
    mask = getattr(mask, "mask", mask)
    num, idx = mask.kv_num_blocks, mask.kv_indices
    kb = idx.shape[-1]
    listed = torch.arange(kb) < num.unsqueeze(-1).long()
    target = torch.where(listed, idx.long(), torch.full_like(idx.long(), kb))
    hit = torch.zeros(*idx.shape[:-1], kb + 1, dtype=torch.bool).scatter_(-1, target, True)
    return hit[..., :kb]
