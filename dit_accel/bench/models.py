"""The benchmark's models: eight published diffusers configs at real sizes, tiny CPU twins, and their builder.

Every model is a whole diffusers pipeline built offline: the transformer and the VAE from their published
configs with random weights, the published scheduler config, no tokenizer and no text encoder (prompt
embeddings of the real shapes are passed in, random), ``output_type="latent"`` (the VAE is built, as a user
would hold it, but not run). Weights are created directly on the target device; on CUDA everything is
bfloat16 except the modules diffusers keeps in float32 (``_keep_in_fp32_modules``), as
``from_pretrained(torch_dtype=torch.bfloat16)`` leaves them.

``layers``: the transformer is built with fewer blocks than the published model (the config's block counts
are lowered; every block of a list has the same shape), so a generation fits the one-call GPU budget. The
speed-ups are then per-layer ratios; the report states the layers used and the published count.

Sources of the published configs (the ``config.json`` of each hub repository's ``transformer/``, ``vae/``
and ``scheduler/`` folders; where diffusers' class defaults equal the published file, the defaults are used):

- Wan2.1: ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` and ``Wan-AI/Wan2.1-T2V-14B-Diffusers``
  (UniPC flow scheduler; flow_shift 3.0 at 480p, 5.0 at 720p as the Wan model cards advise);
- HunyuanVideo: ``hunyuanvideo-community/HunyuanVideo`` (= ``HunyuanVideoTransformer3DModel`` defaults);
- CogVideoX-5B: ``THUDM/CogVideoX-5b`` (48 heads, 42 layers, rotary embeddings; VAE scaling 0.7);
- LTX-Video: ``Lightricks/LTX-Video`` 0.9 (= ``LTXVideoTransformer3DModel`` and ``AutoencoderKLLTXVideo`` defaults);
- FLUX.1-dev: ``black-forest-labs/FLUX.1-dev`` (class defaults with ``guidance_embeds=True``);
- PixArt-Sigma: ``PixArt-alpha/PixArt-Sigma-XL-2-2K-MS`` (sample_size 256, interpolation_scale 4; SDXL VAE);
- SD3.5-large: ``stabilityai/stable-diffusion-3.5-large`` (38 heads of 64, 38 layers, caption_projection_dim 2432).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import torch


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: what to build and how to call it."""

    name: str
    """Stable key in ``bench.json`` (e.g. ``wan2.1-1.3b-480p``)."""
    title: str
    """The published model's name."""
    family: str
    """dit-accel family name (``dit_accel.pipelines.families``)."""
    pipeline: str
    """diffusers pipeline class name."""
    transformer: str
    """diffusers transformer class name."""
    transformer_config: Mapping[str, Any]
    """Transformer config (published values; block counts are lowered by ``layers``)."""
    layer_keys: tuple[str, ...]
    """Config keys holding block counts, in model order (two for FLUX.1 and HunyuanVideo)."""
    vae: str
    """diffusers VAE class name."""
    vae_config: Mapping[str, Any]
    """VAE config (published values)."""
    scheduler: str
    """diffusers scheduler class name."""
    scheduler_config: Mapping[str, Any]
    """Scheduler config (published values)."""
    height: int
    """Pixels."""
    width: int
    """Pixels."""
    frames: int | None
    """Frames (``None`` for image models)."""
    guidance_scale: float
    """The pipeline's ``guidance_scale`` (classifier-free, or embedded for FLUX.1-dev and HunyuanVideo)."""
    embeds: Mapping[str, tuple[int, ...]]
    """Prompt-embedding call arguments and their shapes without the batch dimension."""
    masks: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Attention-mask call arguments: ``(length, valid tokens)`` (valid tokens first, padding after)."""
    extra_call: Mapping[str, Any] = field(default_factory=dict)
    """Other pipeline call arguments."""
    cfg_forwards: int = 1
    """Transformer rows per step (2: classifier-free guidance, batched or as two calls)."""
    sequential_cfg: bool = False
    """Guidance as two transformer calls per step (cond, then uncond) instead of one batched call."""
    text_tokens: int = 0
    """Text tokens in the self-attention sequence (joint attention), else 0."""
    default_layers: tuple[int, ...] | None = None
    """Blocks per list built by default (``None``: all): about 40 ms per transformer call on an H200 where one block
    is cheaper than that (the whole eight-model run fits one 9-minute GPU call), one block per list otherwise."""
    source: str = ""
    """Where the published config comes from."""

    @property
    def full_layers(self) -> tuple[int, ...]:
        """Block counts of the published model, per block list."""
        return tuple(int(self.transformer_config[k]) for k in self.layer_keys)

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        """Token grid ``(F', H', W')`` of the self-attention sequence (without text)."""
        return _LATENT_GRID[self.family](self)

    @property
    def tokens(self) -> int:
        """Visual tokens of one sample."""
        f, h, w = self.latent_grid
        return f * h * w

    def shape(self) -> dict[str, Any]:
        """Plain data for the report."""
        return {
            "height": self.height, "width": self.width, "frames": self.frames,
            "latent_grid": list(self.latent_grid), "tokens": self.tokens, "text_tokens": self.text_tokens,
            "guidance_scale": self.guidance_scale, "rows_per_step": self.cfg_forwards,
            "guidance_calls": "sequential" if self.sequential_cfg else "batched",
        }


def _wan_grid(s: ModelSpec) -> tuple[int, int, int]:
    pt, ph, pw = s.transformer_config["patch_size"]
    f = (s.frames - 1) // s.vae_config.get("scale_factor_temporal", 4) + 1
    sp = s.vae_config.get("scale_factor_spatial", 8)
    return f // pt, s.height // sp // ph, s.width // sp // pw


def _hunyuan_grid(s: ModelSpec) -> tuple[int, int, int]:
    p, pt = s.transformer_config["patch_size"], s.transformer_config["patch_size_t"]
    f = (s.frames - 1) // s.vae_config.get("temporal_compression_ratio", 4) + 1
    sp = s.vae_config.get("spatial_compression_ratio", 8)
    return f // pt, s.height // sp // p, s.width // sp // p


def _cog_grid(s: ModelSpec) -> tuple[int, int, int]:
    p = s.transformer_config["patch_size"]
    f = (s.frames - 1) // s.vae_config.get("temporal_compression_ratio", 4) + 1
    sp = 2 ** (len(s.vae_config.get("block_out_channels", (0, 0, 0, 0))) - 1)
    return f, s.height // sp // p, s.width // sp // p


def _ltx_grid(s: ModelSpec) -> tuple[int, int, int]:
    sp = s.vae_config.get("spatial_compression_ratio") or 32
    tp = s.vae_config.get("temporal_compression_ratio") or 8
    return (s.frames - 1) // tp + 1, s.height // sp, s.width // sp


def _image_grid(s: ModelSpec) -> tuple[int, int, int]:
    sp = 2 ** (len(s.vae_config["block_out_channels"]) - 1)
    p = 2 if s.family == "flux" else s.transformer_config["patch_size"]  # FLUX packs 2x2 latents per token
    return 1, s.height // sp // p, s.width // sp // p


_LATENT_GRID = {"wan": _wan_grid, "hunyuan_video": _hunyuan_grid, "cogvideox": _cog_grid, "ltx_video": _ltx_grid,
                "flux": _image_grid, "pixart": _image_grid, "sd3": _image_grid}


# --- published configs --------------------------------------------------------------------------------------
_WAN_COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                   cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                      solver_order=2, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
_FLOW_DYNAMIC = dict(num_train_timesteps=1000, use_dynamic_shifting=True)
_IMAGE_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                  layers_per_block=2, norm_num_groups=32, sample_size=1024)

SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        name="wan2.1-1.3b-480p", title="Wan2.1-T2V-1.3B", family="wan", pipeline="WanPipeline",
        transformer="WanTransformer3DModel",
        transformer_config=_frozen(dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)),
        layer_keys=("num_layers",), vae="AutoencoderKLWan", vae_config=_frozen({}),
        scheduler="UniPCMultistepScheduler", scheduler_config=_frozen(dict(_WAN_SCHEDULER, flow_shift=3.0)),
        height=480, width=832, frames=81, guidance_scale=5.0,
        embeds=_frozen({"prompt_embeds": (512, 4096), "negative_prompt_embeds": (512, 4096)}),
        cfg_forwards=2, sequential_cfg=True, default_layers=(2,), source="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ),
    ModelSpec(
        name="wan2.1-14b-720p", title="Wan2.1-T2V-14B", family="wan", pipeline="WanPipeline",
        transformer="WanTransformer3DModel",
        transformer_config=_frozen(dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)),
        layer_keys=("num_layers",), vae="AutoencoderKLWan", vae_config=_frozen({}),
        scheduler="UniPCMultistepScheduler", scheduler_config=_frozen(dict(_WAN_SCHEDULER, flow_shift=5.0)),
        height=720, width=1280, frames=81, guidance_scale=5.0,
        embeds=_frozen({"prompt_embeds": (512, 4096), "negative_prompt_embeds": (512, 4096)}),
        cfg_forwards=2, sequential_cfg=True, default_layers=(1,), source="Wan-AI/Wan2.1-T2V-14B-Diffusers",
    ),
    ModelSpec(
        name="hunyuanvideo-544p", title="HunyuanVideo", family="hunyuan_video", pipeline="HunyuanVideoPipeline",
        transformer="HunyuanVideoTransformer3DModel",
        transformer_config=_frozen(dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                        num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
                                        patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                        text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                        rope_axes_dim=(16, 56, 56))),
        layer_keys=("num_layers", "num_single_layers"), vae="AutoencoderKLHunyuanVideo", vae_config=_frozen({}),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=_frozen(dict(num_train_timesteps=1000, shift=7.0)),
        height=544, width=960, frames=61, guidance_scale=6.0,
        embeds=_frozen({"prompt_embeds": (256, 4096), "pooled_prompt_embeds": (768,)}),
        masks=_frozen({"prompt_attention_mask": (256, 64)}),
        cfg_forwards=1, text_tokens=256, default_layers=(1, 1), source="hunyuanvideo-community/HunyuanVideo",
    ),
    ModelSpec(
        name="cogvideox-5b-480p", title="CogVideoX-5B", family="cogvideox", pipeline="CogVideoXPipeline",
        transformer="CogVideoXTransformer3DModel",
        transformer_config=_frozen(dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                                        time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90,
                                        sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=226, use_rotary_positional_embeddings=True,
                                        use_learned_positional_embeddings=False)),
        layer_keys=("num_layers",), vae="AutoencoderKLCogVideoX", vae_config=_frozen(dict(scaling_factor=0.7)),
        scheduler="CogVideoXDPMScheduler",
        scheduler_config=_frozen(dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                      num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing")),
        height=480, width=720, frames=49, guidance_scale=6.0,
        embeds=_frozen({"prompt_embeds": (226, 4096), "negative_prompt_embeds": (226, 4096)}),
        cfg_forwards=2, text_tokens=226, default_layers=(1,), source="THUDM/CogVideoX-5b",
    ),
    ModelSpec(
        name="ltx-video-704p", title="LTX-Video 0.9", family="ltx_video", pipeline="LTXPipeline",
        transformer="LTXVideoTransformer3DModel",
        transformer_config=_frozen(dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1,
                                        num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
                                        num_layers=28, caption_channels=4096, qk_norm="rms_norm_across_heads")),
        layer_keys=("num_layers",), vae="AutoencoderKLLTXVideo", vae_config=_frozen({}),
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=_frozen(dict(_FLOW_DYNAMIC, base_image_seq_len=1024, max_image_seq_len=4096, base_shift=0.95,
                                      max_shift=2.05, shift=1.0, shift_terminal=0.1)),
        height=704, width=1216, frames=121, guidance_scale=3.0,
        embeds=_frozen({"prompt_embeds": (128, 4096), "negative_prompt_embeds": (128, 4096)}),
        masks=_frozen({"prompt_attention_mask": (128, 64), "negative_prompt_attention_mask": (128, 64)}),
        cfg_forwards=2, default_layers=(3,), source="Lightricks/LTX-Video",
    ),
    ModelSpec(
        name="flux.1-dev-1024", title="FLUX.1-dev", family="flux", pipeline="FluxPipeline",
        transformer="FluxTransformer2DModel",
        transformer_config=_frozen(dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
        layer_keys=("num_layers", "num_single_layers"), vae="AutoencoderKL",
        vae_config=_frozen(dict(_IMAGE_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                use_quant_conv=False, use_post_quant_conv=False)),
        scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=_frozen(dict(_FLOW_DYNAMIC, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                                      max_shift=1.15, shift=3.0)),
        height=1024, width=1024, frames=None, guidance_scale=3.5,
        embeds=_frozen({"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)}),
        cfg_forwards=1, text_tokens=512, default_layers=(3, 5), source="black-forest-labs/FLUX.1-dev",
    ),
    ModelSpec(
        name="pixart-sigma-2k", title="PixArt-Sigma-XL-2-2K-MS", family="pixart", pipeline="PixArtSigmaPipeline",
        transformer="PixArtTransformer2DModel",
        transformer_config=_frozen(dict(sample_size=256, num_layers=28, attention_head_dim=72, num_attention_heads=16,
                                        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=1152,
                                        caption_channels=4096, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                                        activation_fn="gelu-approximate", use_additional_conditions=False,
                                        interpolation_scale=4)),
        layer_keys=("num_layers",), vae="AutoencoderKL",
        vae_config=_frozen(dict(_IMAGE_VAE, latent_channels=4, scaling_factor=0.13025)),
        scheduler="DPMSolverMultistepScheduler",
        scheduler_config=_frozen(dict(algorithm_type="dpmsolver++", beta_schedule="linear", beta_start=0.0001,
                                      beta_end=0.02, num_train_timesteps=1000, prediction_type="epsilon",
                                      solver_order=2, solver_type="midpoint", lower_order_final=True)),
        height=2048, width=2048, frames=None, guidance_scale=4.5,
        embeds=_frozen({"prompt_embeds": (300, 4096), "negative_prompt_embeds": (300, 4096)}),
        masks=_frozen({"prompt_attention_mask": (300, 64), "negative_prompt_attention_mask": (300, 64)}),
        extra_call=_frozen({"negative_prompt": None}),
        cfg_forwards=2, default_layers=(4,), source="PixArt-alpha/PixArt-Sigma-XL-2-2K-MS",
    ),
    ModelSpec(
        name="sd3.5-large-1024", title="Stable Diffusion 3.5 Large", family="sd3", pipeline="StableDiffusion3Pipeline",
        transformer="SD3Transformer2DModel",
        transformer_config=_frozen(dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                        caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                        pos_embed_max_size=192, qk_norm="rms_norm")),
        layer_keys=("num_layers",), vae="AutoencoderKL",
        vae_config=_frozen(dict(_IMAGE_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                                use_quant_conv=False, use_post_quant_conv=False)),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=_frozen(dict(num_train_timesteps=1000, shift=3.0)),
        height=1024, width=1024, frames=None, guidance_scale=3.5,
        embeds=_frozen({"prompt_embeds": (333, 4096), "negative_prompt_embeds": (333, 4096),
                        "pooled_prompt_embeds": (2048,), "negative_pooled_prompt_embeds": (2048,)}),
        cfg_forwards=2, text_tokens=333, default_layers=(5,), source="stabilityai/stable-diffusion-3.5-large",
    ),
)}
"""The eight benchmark models at their published configs, by report key."""


# --- tiny CPU twins ------------------------------------------------------------------------------------------
# Same families, pipelines and call paths at a size a 2-core CPU runs in about 0.1 s per generation: 300-400
# visual tokens (three or four 128-token blocks, the last ragged) and two blocks or more per model. The tiny run
# lowers the sparse methods' min_seq_len to 0 (see runs.depth_scaled_method), so the presets plan and run the
# block-sparse path on these short sequences; their first self-attention layer stays dense.
# The tiny "wan2.1-14b-720p" is built with 2 of its 3 blocks, so --tiny also runs the reduced-depth path.
_TINY_IMAGE_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                       layers_per_block=1, norm_num_groups=4, latent_channels=4)

TINY_SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec(
        name="wan2.1-1.3b-480p", title="tiny Wan", family="wan", pipeline="WanPipeline",
        transformer="WanTransformer3DModel",
        transformer_config=_frozen(dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
                                        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)),
        layer_keys=("num_layers",), vae="AutoencoderKLWan",
        vae_config=_frozen(dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                latents_mean=[0.0] * 4, latents_std=[1.0] * 4)),
        scheduler="UniPCMultistepScheduler", scheduler_config=_frozen(dict(_WAN_SCHEDULER, flow_shift=3.0)),
        height=160, width=160, frames=9, guidance_scale=5.0,
        embeds=_frozen({"prompt_embeds": (8, 16), "negative_prompt_embeds": (8, 16)}),
        cfg_forwards=2, sequential_cfg=True, source="tiny",
    ),
    ModelSpec(
        name="wan2.1-14b-720p", title="tiny Wan (second size)", family="wan", pipeline="WanPipeline",
        transformer="WanTransformer3DModel",
        transformer_config=_frozen(dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4,
                                        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=3,
                                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64)),
        layer_keys=("num_layers",), vae="AutoencoderKLWan",
        vae_config=_frozen(dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                latents_mean=[0.0] * 4, latents_std=[1.0] * 4)),
        scheduler="UniPCMultistepScheduler", scheduler_config=_frozen(dict(_WAN_SCHEDULER, flow_shift=5.0)),
        height=160, width=160, frames=9, guidance_scale=5.0,
        embeds=_frozen({"prompt_embeds": (8, 16), "negative_prompt_embeds": (8, 16)}),
        cfg_forwards=2, sequential_cfg=True, default_layers=(2,), source="tiny",
    ),
    ModelSpec(
        name="hunyuanvideo-544p", title="tiny HunyuanVideo", family="hunyuan_video", pipeline="HunyuanVideoPipeline",
        transformer="HunyuanVideoTransformer3DModel",
        transformer_config=_frozen(dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
                                        patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(16, 24, 24))),
        layer_keys=("num_layers", "num_single_layers"), vae="AutoencoderKLHunyuanVideo",
        vae_config=_frozen(dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=_frozen(dict(num_train_timesteps=1000, shift=7.0)),
        height=160, width=160, frames=9, guidance_scale=6.0,
        embeds=_frozen({"prompt_embeds": (12, 16), "pooled_prompt_embeds": (8,)}),
        masks=_frozen({"prompt_attention_mask": (12, 9)}),
        cfg_forwards=1, text_tokens=12, source="tiny",
    ),
    ModelSpec(
        name="cogvideox-5b-480p", title="tiny CogVideoX", family="cogvideox", pipeline="CogVideoXPipeline",
        transformer="CogVideoXTransformer3DModel",
        transformer_config=_frozen(dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                                        time_embed_dim=16, text_embed_dim=16, num_layers=2, sample_width=20,
                                        sample_height=20, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                        max_text_seq_length=8, use_rotary_positional_embeddings=True)),
        layer_keys=("num_layers",), vae="AutoencoderKLCogVideoX",
        vae_config=_frozen(dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                norm_num_groups=4, scaling_factor=0.7)),
        scheduler="CogVideoXDPMScheduler", scheduler_config=SPECS["cogvideox-5b-480p"].scheduler_config,
        height=160, width=160, frames=9, guidance_scale=6.0,
        embeds=_frozen({"prompt_embeds": (8, 16), "negative_prompt_embeds": (8, 16)}),
        cfg_forwards=2, text_tokens=8, source="tiny",
    ),
    ModelSpec(
        name="ltx-video-704p", title="tiny LTX-Video", family="ltx_video", pipeline="LTXPipeline",
        transformer="LTXVideoTransformer3DModel",
        transformer_config=_frozen(dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64,
                                        cross_attention_dim=128, num_layers=2, caption_channels=16,
                                        qk_norm="rms_norm_across_heads")),
        layer_keys=("num_layers",), vae="AutoencoderKLLTXVideo",
        vae_config=_frozen(dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatial_compression_ratio=32, temporal_compression_ratio=8)),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=SPECS["ltx-video-704p"].scheduler_config,
        height=320, width=320, frames=17, guidance_scale=3.0,
        embeds=_frozen({"prompt_embeds": (8, 16), "negative_prompt_embeds": (8, 16)}),
        masks=_frozen({"prompt_attention_mask": (8, 6), "negative_prompt_attention_mask": (8, 6)}),
        cfg_forwards=2, source="tiny",
    ),
    ModelSpec(
        name="flux.1-dev-1024", title="tiny FLUX.1", family="flux", pipeline="FluxPipeline",
        transformer="FluxTransformer2DModel",
        transformer_config=_frozen(dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=32,
                                        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 24, 24))),
        layer_keys=("num_layers", "num_single_layers"), vae="AutoencoderKL",
        vae_config=_frozen(_TINY_IMAGE_VAE), scheduler="FlowMatchEulerDiscreteScheduler",
        scheduler_config=SPECS["flux.1-dev-1024"].scheduler_config,
        height=320, width=320, frames=None, guidance_scale=3.5,
        embeds=_frozen({"prompt_embeds": (8, 32), "pooled_prompt_embeds": (32,)}),
        cfg_forwards=1, text_tokens=8, source="tiny",
    ),
    ModelSpec(
        name="pixart-sigma-2k", title="tiny PixArt-Sigma", family="pixart", pipeline="PixArtSigmaPipeline",
        transformer="PixArtTransformer2DModel",
        transformer_config=_frozen(dict(sample_size=40, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                                        in_channels=4, out_channels=8, patch_size=2, cross_attention_dim=128,
                                        caption_channels=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                        norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True,
                                        activation_fn="gelu-approximate", use_additional_conditions=False)),
        layer_keys=("num_layers",), vae="AutoencoderKL", vae_config=_frozen(_TINY_IMAGE_VAE),
        scheduler="DPMSolverMultistepScheduler", scheduler_config=SPECS["pixart-sigma-2k"].scheduler_config,
        height=320, width=320, frames=None, guidance_scale=4.5,
        embeds=_frozen({"prompt_embeds": (8, 16), "negative_prompt_embeds": (8, 16)}),
        masks=_frozen({"prompt_attention_mask": (8, 5), "negative_prompt_attention_mask": (8, 5)}),
        extra_call=_frozen({"negative_prompt": None, "use_resolution_binning": False}),
        cfg_forwards=2, source="tiny",
    ),
    ModelSpec(
        name="sd3.5-large-1024", title="tiny SD3.5", family="sd3", pipeline="StableDiffusion3Pipeline",
        transformer="SD3Transformer2DModel",
        transformer_config=_frozen(dict(sample_size=64, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96,
                                        qk_norm="rms_norm")),
        layer_keys=("num_layers",), vae="AutoencoderKL", vae_config=_frozen(_TINY_IMAGE_VAE),
        scheduler="FlowMatchEulerDiscreteScheduler", scheduler_config=_frozen(dict(num_train_timesteps=1000, shift=3.0)),
        height=320, width=320, frames=None, guidance_scale=3.5,
        embeds=_frozen({"prompt_embeds": (10, 32), "negative_prompt_embeds": (10, 32),
                        "pooled_prompt_embeds": (64,), "negative_pooled_prompt_embeds": (64,)}),
        cfg_forwards=2, text_tokens=10, source="tiny",
    ),
)}
"""Tiny twins of :data:`SPECS` (same keys, families and pipelines) for ``dit-accel bench --tiny`` on a CPU."""


def model_specs(tiny: bool) -> dict[str, ModelSpec]:
    """The real specs, or their tiny twins."""
    return TINY_SPECS if tiny else SPECS


def resolve_layers(spec: ModelSpec, layers: int | None) -> tuple[int, ...]:
    """Blocks per list to build: ``layers`` in total (split over FLUX.1's and HunyuanVideo's two lists in the
    published proportion, at least one each), the spec's default when ``None``, capped at the published counts."""
    full = spec.full_layers
    if layers is None:
        return spec.default_layers or full
    if layers < len(full):
        raise ValueError(f"--layers {layers} for {spec.name}: it has {len(full)} block lists, so at least {len(full)}")
    if len(full) == 1:
        return (min(layers, full[0]),)
    first = max(1, min(full[0], round(layers * full[0] / sum(full))))
    return first, max(1, min(full[1], layers - first))


# --- cost estimate ------------------------------------------------------------------------------------------
ATTENTION_TFLOPS = 570.0
"""Dense bf16 attention on one H200 (cuDNN SDPA, /work/shared/gpu.md)."""
LINEAR_TFLOPS = 600.0
"""Effective bf16 GEMM throughput assumed for the projections and MLPs."""
ELEMENTWISE_S_PER_ELEMENT = 8.4e-11
"""Norms, modulation, RoPE and copies per (token x hidden size x block): fitted so that the estimate gives the
measured 611 ms of one Wan2.1-1.3B 480p forward on the H200."""


def block_params(spec: ModelSpec) -> list[int]:
    """Parameters of one block of each block list, counted on a meta-device build (no memory, no time)."""
    from dit_accel.caching import find_blocks

    with torch.device("meta"):
        model = _transformer_class(spec).from_config(_config_with_layers(spec, tuple(1 for _ in spec.layer_keys)))
    counts: dict[str, int] = {}
    for ref in find_blocks(model):
        counts.setdefault(ref.name.rsplit(".", 1)[0], sum(p.numel() for p in ref.module.parameters()))
    return list(counts.values())


def estimate_forward_s(spec: ModelSpec, layers: tuple[int, ...], params: list[int] | None = None) -> float:
    """Seconds of one transformer call on an H200 (all guidance rows), from FLOPs: attention at
    :data:`ATTENTION_TFLOPS`, weights at :data:`LINEAR_TFLOPS`, elementwise work per token and channel."""
    params = params if params is not None else block_params(spec)
    cfg = spec.transformer_config
    heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
    rows = 1 if spec.sequential_cfg else spec.cfg_forwards
    seq = spec.tokens + spec.text_tokens
    attn = 4.0 * seq * seq * heads * head_dim * rows / (ATTENTION_TFLOPS * 1e12)
    total = 0.0
    for count, p in zip(layers, params):
        linear = 2.0 * p * seq * rows / (LINEAR_TFLOPS * 1e12)
        elementwise = seq * heads * head_dim * rows * ELEMENTWISE_S_PER_ELEMENT
        total += count * (attn + linear + elementwise)
    return total


def calls_per_generation(spec: ModelSpec, steps: int) -> int:
    """Transformer calls of one generation."""
    return steps * (2 if spec.sequential_cfg else 1)


# --- building ----------------------------------------------------------------------------------------------
def _transformer_class(spec: ModelSpec) -> Any:
    import diffusers

    return getattr(diffusers, spec.transformer)


def _config_with_layers(spec: ModelSpec, layers: tuple[int, ...]) -> dict[str, Any]:
    cfg = dict(spec.transformer_config)
    for key, count in zip(spec.layer_keys, layers):
        cfg[key] = int(count)
    return cfg


def _cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` except the ``_keep_in_fp32_modules`` tensors, which stay as built (float32)."""
    from diffusers.utils import logging as diffusers_logging

    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    saved = {n: t.data for n, t in tensors if t.is_floating_point() and any(p in keep for p in n.split("."))}
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "cast with to()" warning: the float32 modules are restored below
    try:
        model = model.to(dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if n in saved:
            t.data = saved[n]
    return model


@dataclass
class BuiltModel:
    """A built pipeline and how to call it."""

    spec: ModelSpec
    """What was built."""
    pipe: Any
    """The diffusers pipeline."""
    layers: tuple[int, ...]
    """Blocks built per block list."""
    call_kwargs: dict[str, Any]
    """Arguments of every timed generation (prompt embeddings, size, steps, guidance, latent output)."""
    build_s: float
    """Seconds to build (host clock, after a device sync)."""
    weights_gib: float
    """Transformer + VAE weights in GiB."""

    def generator(self, seed: int = 0) -> torch.Generator:
        """A CPU generator: the same initial noise on every device."""
        return torch.Generator(device="cpu").manual_seed(seed)

    def layers_info(self) -> dict[str, Any]:
        """Layers used and the published counts, with how to read the numbers."""
        return {
            "used": dict(zip(self.spec.layer_keys, self.layers)),
            "full": dict(zip(self.spec.layer_keys, self.spec.full_layers)),
            "scaling": "per-layer: the transformer keeps only the 'used' blocks of each list (all blocks of a list have "
                       "one shape), so speed-ups are per-layer ratios of the stock model; seconds are those of this "
                       "reduced model, not of the published one",
        }


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, layers: tuple[int, ...], steps: int,
                seed: int = 0) -> BuiltModel:
    """Build ``spec``'s pipeline on ``device`` (weights created there, random, ``dtype`` except float32 modules)."""
    import diffusers

    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = _transformer_class(spec).from_config(_config_with_layers(spec, layers))
        vae = getattr(diffusers, spec.vae).from_config(dict(spec.vae_config))
    transformer = _cast_keeping_fp32(transformer, dtype).eval().requires_grad_(False)
    vae = _cast_keeping_fp32(vae, dtype).eval().requires_grad_(False)
    scheduler = getattr(diffusers, spec.scheduler).from_config(dict(spec.scheduler_config))
    pipe_cls = getattr(diffusers, spec.pipeline)
    components: dict[str, Any] = {}
    import inspect

    for name in inspect.signature(pipe_cls.__init__).parameters:
        if name == "self":
            continue
        components[name] = {"transformer": transformer, "vae": vae, "scheduler": scheduler}.get(name)
    pipe = pipe_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    kwargs: dict[str, Any] = {}
    for key, shape in spec.embeds.items():
        kwargs[key] = torch.randn(1, *shape, generator=g).to(device, dtype)
    for key, (length, valid) in spec.masks.items():
        mask = torch.zeros(1, length, dtype=torch.long)
        mask[:, :valid] = 1
        kwargs[key] = mask.to(device)
    kwargs.update(height=spec.height, width=spec.width, num_inference_steps=steps, guidance_scale=spec.guidance_scale,
                  output_type="latent")
    if spec.frames is not None:
        kwargs["num_frames"] = spec.frames
    kwargs.update(spec.extra_call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    weights = sum(p.numel() * p.element_size() for m in (transformer, vae) for p in m.parameters())
    return BuiltModel(spec, pipe, layers, kwargs, time.perf_counter() - start, weights / 2**30)


def forward_tflop(spec: ModelSpec, layers: tuple[int, ...], params: list[int]) -> float:
    """Dense TFLOP of one transformer call (attention + weights), for the report."""
    cfg = spec.transformer_config
    rows = 1 if spec.sequential_cfg else spec.cfg_forwards
    seq = spec.tokens + spec.text_tokens
    attn = 4.0 * seq * seq * int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]) * rows
    linear = sum(c * 2.0 * p * seq * rows for c, p in zip(layers, params))
    return (attn * sum(layers) + linear) / 1e12


def describe(spec: ModelSpec, layers: tuple[int, ...], steps: int, params: list[int] | None = None) -> dict[str, Any]:
    """Size and estimated cost of one model for the dry run and the report."""
    params = params if params is not None else block_params(spec)
    forward = estimate_forward_s(spec, layers, params)
    calls = calls_per_generation(spec, steps)
    return {
        "layers": list(layers), "full_layers": list(spec.full_layers), "tokens": spec.tokens,
        "text_tokens": spec.text_tokens, "block_params_m": [round(p / 1e6, 1) for p in params],
        "forward_tflop": round(forward_tflop(spec, layers, params), 2),
        "est_forward_ms": round(forward * 1e3, 1), "calls_per_generation": calls,
        "est_generation_s": round(forward * calls, 3),
        "est_full_model_forward_ms": round(estimate_forward_s(spec, spec.full_layers, params) * 1e3, 1),
    }

