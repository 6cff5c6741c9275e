"""Shared tiny random-weight transformers (built offline from small configs) for the processor tests.

Every family's model uses head dim 64 (a head dim the block-sparse kernel takes) so the same model
exercises both the dense path and the sparse path; sequences span two 128-token blocks (the last one
ragged) so the block mask is more than one tile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker (and per subprocess a test starts): `-n 2` on two cores then runs two
    # tests side by side instead of four threads fighting for two cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@dataclass(frozen=True)
class TinyCase:
    """A tiny transformer and the inputs of one forward call."""

    family: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]


def _seeded(fn):
    def wrapper():
        torch.manual_seed(0)
        return fn()

    return wrapper


@_seeded
def _wan_model(i2v: bool = False):
    from diffusers import WanTransformer3DModel

    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    return WanTransformer3DModel.from_config(cfg).eval()


def _wan_i2v_model():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=8, added_kv_proj_dim=128,
    )
    return WanTransformer3DModel.from_config(cfg).eval()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _wan_inputs():
    g = _gen()
    # grid (2, 10, 10) = 200 tokens: two 128-token blocks, the last ragged
    return dict(
        hidden_states=torch.randn(1, 4, 2, 20, 20, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 12, 16, generator=g),
    )


def _wan_i2v_inputs():
    g = _gen()
    # Wan's I2V processor hard-codes a 512-token text context before the image tokens.
    return dict(
        hidden_states=torch.randn(1, 4, 2, 20, 20, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, 16, generator=g),
        encoder_hidden_states_image=torch.randn(1, 5, 8, generator=g),
    )


def _hunyuan_model():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(16, 24, 24),
    )
    return HunyuanVideoTransformer3DModel.from_config(cfg).eval()


def _hunyuan_inputs():
    g = _gen()
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 9:] = False  # three padded text tokens at the end, as the pipeline gives them
    return dict(
        hidden_states=torch.randn(1, 4, 2, 10, 8, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 12, 16, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(1, 8, generator=g),
        guidance=torch.tensor([3500.0]),
    )


def _cogvideox_model():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=2, sample_width=20, sample_height=20, sample_frames=5, patch_size=2,
        patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8,
    )
    return CogVideoXTransformer3DModel.from_config(cfg).eval()


def _cogvideox_inputs():
    g = _gen()
    return dict(
        hidden_states=torch.randn(1, 2, 4, 20, 20, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 8, generator=g),
        timestep=torch.tensor([500]),
    )


def _cogvideox15_model():
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=8, num_layers=1, sample_width=20, sample_height=20, sample_frames=13, patch_size=2,
        patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    )
    return CogVideoXTransformer3DModel.from_config(cfg).eval()


def _cogvideox15_inputs():
    g = _gen()
    video_tokens = 2 * 10 * 10  # 4 latent frames / patch_size_t 2, 20x20 / patch 2
    # RoPE (cos, sin) as the pipeline passes it, so the processor's RoPE branch is exercised too
    rope = (torch.randn(video_tokens, 64, generator=g), torch.randn(video_tokens, 64, generator=g))
    return dict(
        hidden_states=torch.randn(1, 4, 4, 20, 20, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 8, generator=g),
        timestep=torch.tensor([500]),
        image_rotary_emb=rope,
    )


def _ltx_model():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    cfg = dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=1, qk_norm="rms_norm_across_heads", caption_channels=16,
    )
    return LTXVideoTransformer3DModel.from_config(cfg).eval()


def _ltx_inputs():
    g = _gen()
    mask = torch.ones(1, 8)
    mask[:, 6:] = 0
    return dict(
        hidden_states=torch.randn(1, 2 * 10 * 10, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
        timestep=torch.tensor([500]),
        encoder_attention_mask=mask,
        num_frames=2,
        height=10,
        width=10,
    )


def _flux_model():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[16, 24, 24],
    )
    return FluxTransformer2DModel.from_config(cfg).eval()


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's packed-latent ids: (frame=0, row, col) per token, row-major."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def _flux_inputs():
    g = _gen()
    return dict(
        hidden_states=torch.randn(1, 12 * 10, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=flux_image_ids(12, 10),
        txt_ids=torch.zeros(8, 3),
    )


def _pixart_model():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(
        sample_size=24, num_layers=1, patch_size=2, attention_head_dim=64, num_attention_heads=2,
        in_channels=4, cross_attention_dim=128, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, caption_channels=16,
    )
    return PixArtTransformer2DModel.from_config(cfg).eval()


def _pixart_inputs():
    g = _gen()
    mask = torch.ones(1, 8)
    mask[:, 5:] = 0
    return dict(
        hidden_states=torch.randn(1, 4, 28, 20, generator=g),  # 14 x 10 = 140 tokens
        encoder_hidden_states=torch.randn(1, 8, 16, generator=g),
        timestep=torch.tensor([500]),
        encoder_attention_mask=mask,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _sd3_model():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    cfg = dict(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        caption_projection_dim=128, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    return SD3Transformer2DModel.from_config(cfg).eval()


def _sd3_inputs():
    g = _gen()
    return dict(
        hidden_states=torch.randn(1, 4, 24, 20, generator=g),  # 12 x 10 = 120 image tokens
        encoder_hidden_states=torch.randn(1, 10, 32, generator=g),
        pooled_projections=torch.randn(1, 64, generator=g),
        timestep=torch.tensor([500]),
    )


TINY_CASES: dict[str, TinyCase] = {
    c.family: c
    for c in (
        TinyCase("wan", _wan_model, _wan_inputs),
        TinyCase("wan_i2v", _wan_i2v_model, _wan_i2v_inputs),
        TinyCase("hunyuan_video", _hunyuan_model, _hunyuan_inputs),
        TinyCase("cogvideox", _cogvideox_model, _cogvideox_inputs),
        TinyCase("cogvideox15", _cogvideox15_model, _cogvideox15_inputs),
        TinyCase("ltx_video", _ltx_model, _ltx_inputs),
        TinyCase("flux", _flux_model, _flux_inputs),
        TinyCase("pixart", _pixart_model, _pixart_inputs),
        TinyCase("sd3", _sd3_model, _sd3_inputs),
    )
}
"""Tiny model cases by name (Wan: T2V and I2V; CogVideoX: 1.0 and 1.5 with RoPE)."""

EXPECTED_GRID = {
    "wan": (2, 10, 10),
    "wan_i2v": (2, 10, 10),
    "hunyuan_video": (2, 10, 8),
    "cogvideox": (2, 10, 10),
    "cogvideox15": (2, 10, 10),
    "ltx_video": (2, 10, 10),
    "flux": (1, 12, 10),
    "pixart": (1, 14, 10),
    "sd3": (1, 12, 10),
}
"""Latent token grid (F', H', W') each case's inputs imply."""


def run_model(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One forward, returning the sample tensor."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)
    return out[0]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on tiny shapes two threads fighting for the two shared
    cores are far slower than one. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
