"""`TestbedPipeline`: text-to-video with the testbed DiT, in the shape of diffusers' `WanPipeline`.

Components (registered modules, saved/loaded by `save_pretrained` / `from_pretrained`):
    transformer   diffusers `WanTransformer3DModel` (the Wan attention processors run on it)
    vae           `TestbedAutoencoder` (per-frame, 4x spatial), latents normalised with its config stats
    text_encoder  `TestbedTextEncoder` (the grammar's words; tokenisation by `captions.tokenize`)
    scheduler     diffusers `FlowMatchEulerDiscreteScheduler`

Loading: `model_index.json` records our two custom classes under their module paths
(`dit_accel.testbed.autoencoder`, `dit_accel.testbed.text_encoder`). diffusers 0.42 resolves such a
library name from `sys.modules`; importing this module imports both, so plain
`TestbedPipeline.from_pretrained(folder)` works offline with no override.

The denoising loop mirrors WanPipeline's: the conditional and unconditional branches are separate
transformer calls inside `transformer.cache_context("cond" | "uncond", step_index=..., sigma=...,
num_inference_steps=...)`, so diffusers cache hooks and our schedulers see the same contexts as on Wan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .autoencoder import TestbedAutoencoder
from .text_encoder import TestbedTextEncoder

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class TestbedPipelineOutput(BaseOutput):
    """Output of `TestbedPipeline`."""

    frames: np.ndarray | torch.Tensor
    """np.ndarray (B, T, H, W, 3) in [0, 1] for output_type "np"; torch.Tensor (B, T, 3, H, W) in [0, 1] for
    "pt"; normalised latents (B, C, T, h, w) for "latent"."""


class TestbedPipeline(DiffusionPipeline):
    """Text-to-video pipeline of the dit-accel testbed (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        vae: TestbedAutoencoder,
        text_encoder: TestbedTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, scheduler=scheduler)

    # ------------------------------------------------------------------ sizes
    @property
    def vae_scale_factor_spatial(self) -> int:
        """Pixels per latent pixel (height and width)."""
        return self.vae.scale_factor_spatial

    @property
    def vae_scale_factor_temporal(self) -> int:
        """Frames per latent frame (1: no temporal compression)."""
        return self.vae.config.scale_factor_temporal

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: autoencoder factor x transformer patch."""
        return self.vae_scale_factor_spatial * int(self.transformer.config.patch_size[1])

    def check_inputs(self, prompt: Any, negative_prompt: Any, height: Any, width: Any, num_frames: Any,
                     num_inference_steps: Any, output_type: Any) -> None:
        """Raise ValueError/TypeError naming the bad argument and what is allowed."""
        if isinstance(prompt, str):
            pass
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            pass
        else:
            raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
        if negative_prompt is not None:
            n_prompts = 1 if isinstance(prompt, str) else len(prompt)
            if isinstance(negative_prompt, list):
                if len(negative_prompt) != n_prompts or not all(isinstance(p, str) for p in negative_prompt):
                    raise ValueError(f"negative_prompt list must hold {n_prompts} str, got {negative_prompt!r}")
            elif not isinstance(negative_prompt, str):
                raise TypeError(f"negative_prompt must be None, a str or a list of str, got {negative_prompt!r}")
        m = self.size_multiple
        max_tokens_side = int(self.transformer.config.rope_max_seq_len)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % m:
                raise ValueError(
                    f"{name} must be a positive multiple of {m} (autoencoder {self.vae_scale_factor_spatial}x "
                    f"times patch {self.transformer.config.patch_size[1]}), e.g. 128, 192, 256, 384; got {value!r}"
                )
            if value // m > max_tokens_side:
                raise ValueError(f"{name}={value} exceeds the rotary table: at most {m * max_tokens_side} pixels")
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or not 1 <= num_frames <= max_tokens_side:
            raise ValueError(
                f"num_frames must be an int in [1, {max_tokens_side}] (no temporal compression: any frame count "
                f"works; trained on 8-32), got {num_frames!r}"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    # ------------------------------------------------------------------ text
    def encode_text(self, captions_list: list[str], device: torch.device) -> torch.Tensor:
        """Tokenise captions with the grammar's tokenizer and embed them: (B, 1 + max_length, text_dim).

        The empty caption "" is the unconditional input (only the begin token is real).
        Unknown words raise ValueError (from `captions.tokenize`, listing the vocabulary).
        """
        from . import captions  # the grammar (owned by the data side); imported late to keep imports light

        max_length = int(self.text_encoder.config.max_length)
        ids = torch.zeros(len(captions_list), max_length, dtype=torch.long)
        mask = torch.zeros(len(captions_list), max_length, dtype=torch.bool)
        real = [i for i, c in enumerate(captions_list) if c.strip()]
        if real:
            r_ids, r_mask = captions.tokenize([captions_list[i] for i in real], max_length=max_length)
            ids[real, : r_ids.shape[1]] = r_ids.cpu()
            mask[real, : r_mask.shape[1]] = r_mask.cpu().bool()
        ids = self.text_encoder.remap_ids(ids, captions.VOCAB)
        te_device = next(self.text_encoder.parameters()).device
        emb = self.text_encoder(ids.to(te_device), mask.to(te_device))
        return emb.to(device)

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings of the prompts and, with guidance, of the negative prompts ("" by default)."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds = self.encode_text(prompts, device).repeat_interleave(num_videos_per_prompt, dim=0)
        negative_embeds = None
        if do_classifier_free_guidance:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            negative_embeds = self.encode_text(negatives, device).repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_embeds

    # ------------------------------------------------------------------ latents
    def prepare_latents(
        self,
        batch_size: int,
        num_frames: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gaussian noise in the normalised latent space, (B, C, T, H/f, W/f), float32."""
        f = self.vae_scale_factor_spatial
        shape = (batch_size, int(self.transformer.config.in_channels), num_frames, height // f, width // f)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} videos")
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> video (B, T, 3, H, W) in [0, 1], float32."""
        vae_device = next(self.vae.parameters()).device
        raw = self.vae.denormalize(latents.to(vae_device, self.vae.dtype))
        video = self.vae.decode(raw, return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ call
    @property
    def guidance_scale(self) -> float:
        """Guidance scale of the current call."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current call runs the unconditional branch."""
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """Number of denoising steps of the current call."""
        return self._num_timesteps

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 8,
        height: int = 128,
        width: int = 128,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> TestbedPipelineOutput | tuple:
        """Generate videos from grammar captions.

        Args:
            prompt: caption(s) in the testbed grammar, e.g. "a small red circle moving left on a striped background".
            negative_prompt: caption(s) for the unconditional branch; default "" (the empty caption).
            num_frames, height, width: output size in pixels/frames; height and width multiples of
                `size_multiple` (8). CPU size 128x128x8, evaluation size 256x256x16.
            num_inference_steps: Euler steps of the flow-matching scheduler.
            guidance_scale: classifier-free guidance weight; <= 1 disables the unconditional branch.
            num_videos_per_prompt: videos per caption.
            generator: torch.Generator(s) for the initial noise (deterministic output for a seed).
            latents: optional initial noise (B, C, T, H/4, W/4) in the normalised latent space.
            output_type: "np", "pt" or "latent" (see `TestbedPipelineOutput`).
            return_dict: return a `TestbedPipelineOutput` (True) or a tuple.
            attention_kwargs: passed to the transformer's attention processors.
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` after each step.
            callback_on_step_end_tensor_inputs: names passed in callback_kwargs (only "latents").
        """
        self.check_inputs(prompt, negative_prompt, height, width, num_frames, num_inference_steps, output_type)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        bad = [k for k in tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor inputs {bad} not allowed; allowed: {self._callback_tensor_inputs}")
        self._guidance_scale = float(guidance_scale)
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        prompt_embeds, negative_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, num_videos_per_prompt, device
        )
        transformer_dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_embeds is not None:
            negative_embeds = negative_embeds.to(transformer_dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        latents = self.prepare_latents(
            prompt_embeds.shape[0], num_frames, height, width, device, generator, latents
        )

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                self._current_timestep = t
                model_input = latents.to(transformer_dtype)
                timestep = t.expand(latents.shape[0])
                context = {
                    "step_index": i,
                    "sigma": float(self.scheduler.sigmas[i]),
                    "num_inference_steps": self._num_timesteps,
                }
                with self.transformer.cache_context("cond", **context):
                    noise_pred = self.transformer(
                        hidden_states=model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                        attention_kwargs=attention_kwargs, return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond", **context):
                        noise_uncond = self.transformer(
                            hidden_states=model_input, timestep=timestep, encoder_hidden_states=negative_embeds,
                            attention_kwargs=attention_kwargs, return_dict=False,
                        )[0]
                    noise_pred = noise_uncond + self._guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    # Only "latents" is a valid tensor input (checked above); no locals() lookup, which a
                    # comprehension cannot see on Python < 3.12.
                    callback_kwargs = {k: latents for k in tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.pop("latents", latents)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            frames: np.ndarray | torch.Tensor = latents
        else:
            video = self.decode_latents(latents)
            frames = video if output_type == "pt" else video.permute(0, 1, 3, 4, 2).cpu().numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return TestbedPipelineOutput(frames=frames)


def build_pipeline(
    vocab: tuple[str, ...] | list[str],
    *,
    transformer_config: dict[str, Any] | None = None,
    autoencoder_config: dict[str, Any] | None = None,
    text_encoder_config: dict[str, Any] | None = None,
    shift: float = 3.0,
) -> TestbedPipeline:
    """A randomly initialised testbed pipeline (training start, tests with tiny configs).

    Args:
        vocab: the text encoder's words ("<pad>" first), normally `captions.VOCAB`.
        transformer_config: `WanTransformer3DModel` config (default: `model.transformer_config()`);
            its `in_channels` must equal the autoencoder's `z_dim` and `text_dim` the text encoder's width.
        autoencoder_config: `TestbedAutoencoder` kwargs (default: the shipped shape).
        text_encoder_config: `TestbedTextEncoder` kwargs other than vocab (default: the shipped shape).
        shift: flow-matching timestep shift of the scheduler (more steps at high noise when > 1).
    """
    from .model import build_transformer
    from .model import transformer_config as default_transformer_config

    ae = TestbedAutoencoder(**(autoencoder_config or {}))
    te = TestbedTextEncoder(vocab=tuple(vocab), **(text_encoder_config or {}))
    cfg = dict(transformer_config or default_transformer_config(in_channels=ae.config.z_dim, text_dim=te.config.width))
    if cfg["in_channels"] != ae.config.z_dim or cfg["text_dim"] != te.config.width:
        raise ValueError(
            f"transformer in_channels/text_dim ({cfg['in_channels']}, {cfg['text_dim']}) must match the "
            f"autoencoder z_dim ({ae.config.z_dim}) and text encoder width ({te.config.width})"
        )
    transformer = build_transformer(cfg)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return TestbedPipeline(transformer=transformer, vae=ae, text_encoder=te, scheduler=scheduler)


def generate_videos(pipe: TestbedPipeline, captions: list[str], *, frames: int, side: int, steps: int,
                    guidance: float, seed: int, batch: int) -> tuple[torch.Tensor, float]:
    """One video per caption (seed ``seed + index``), ``batch`` captions per pipeline call.

    Returns the ``"pt"`` frames ``(B, T, 3, H, W)`` in [0, 1], float32 on CPU, and the wall seconds of all
    calls (the GPU synchronised before the clock stops). Shared by the quality benchmarks.
    """
    device = pipe._execution_device
    out = []
    start = time.perf_counter()
    for i in range(0, len(captions), batch):
        chunk = captions[i : i + batch]
        gens = [torch.Generator(device=device).manual_seed(seed + i + j) for j in range(len(chunk))]
        video = pipe(chunk, num_frames=frames, height=side, width=side, num_inference_steps=steps,
                     guidance_scale=guidance, generator=gens, output_type="pt").frames
        out.append(video.float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), time.perf_counter() - start
