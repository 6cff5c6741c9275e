"""A small per-frame convolutional autoencoder: the testbed's latent space.

Real video DiTs run on the latents of an autoencoder (8x spatial, 4x temporal compression for Wan).
Our testbed compresses each frame 4x in space (no temporal compression), so 256x256 px x 16 frames
becomes 64x64 latents x 16 frames, and the Wan patch (1, 2, 2) turns that into 32x32 tokens x 16
frames = 16,384 video tokens. Frames are independent: the autoencoder holds no motion, the DiT
has to model all of it.

The config keeps the field names of diffusers' `AutoencoderKLWan` that pipelines read
(`z_dim`, `latents_mean`, `latents_std`, `scale_factor_spatial`, `scale_factor_temporal`), so code
written for Wan's VAE config reads ours the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class AutoencoderOutput(BaseOutput):
    """Output of `TestbedAutoencoder.decode`."""

    sample: torch.Tensor
    """Decoded video, (B, 3, T, H, W), roughly in [-1, 1] (not clamped)."""


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block on (N, C, H, W) frames."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class TestbedAutoencoder(ModelMixin, ConfigMixin):
    """Per-frame 2D conv autoencoder, `2 ** (len(block_channels) - 1)` x spatial compression.

    `encode(video)` takes (B, 3, T, H, W) in [-1, 1] and returns raw latents (B, z_dim, T, H/f, W/f);
    `decode(latents)` inverts it. Normalisation to zero mean / unit std per channel is done by the
    pipeline with `latents_mean` / `latents_std` from the config (as WanPipeline does), so the DiT
    sees `(z - mean) / std`.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        z_dim: int = 8,
        block_channels: tuple[int, ...] = (32, 64, 128),
        norm_groups: int = 8,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        scale_factor_temporal: int = 1,
    ) -> None:
        super().__init__()
        if scale_factor_temporal != 1:
            raise ValueError(f"scale_factor_temporal must be 1 (per-frame autoencoder), got {scale_factor_temporal}")
        chans = list(block_channels)
        # Encoder: conv_in, then per level a res block and (except the last) a stride-2 conv.
        self.enc_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        enc: list[nn.Module] = []
        for i, c in enumerate(chans):
            enc.append(_ResBlock(c, norm_groups))
            if i + 1 < len(chans):
                enc.append(nn.Conv2d(c, chans[i + 1], 3, stride=2, padding=1))
        enc.append(_ResBlock(chans[-1], norm_groups))
        self.encoder = nn.Sequential(*enc)
        self.enc_norm = nn.GroupNorm(norm_groups, chans[-1])
        self.enc_out = nn.Conv2d(chans[-1], z_dim, 3, padding=1)
        # Decoder mirrors it with nearest upsampling + conv (no checkerboard artefacts).
        self.dec_in = nn.Conv2d(z_dim, chans[-1], 3, padding=1)
        dec: list[nn.Module] = [_ResBlock(chans[-1], norm_groups)]
        for i in range(len(chans) - 1, -1, -1):
            dec.append(_ResBlock(chans[i], norm_groups))
            if i > 0:
                dec.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                dec.append(nn.Conv2d(chans[i], chans[i - 1], 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.dec_norm = nn.GroupNorm(norm_groups, chans[0])
        self.dec_out = nn.Conv2d(chans[0], in_channels, 3, padding=1)

    @property
    def scale_factor_spatial(self) -> int:
        """Pixels per latent pixel along height and width."""
        return 2 ** (len(self.config.block_channels) - 1)

    def _check_video(self, video: torch.Tensor, channels: int, what: str) -> None:
        if video.ndim != 5 or video.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, T, H, W), got shape {tuple(video.shape)}")

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Encode (N, 3, H, W) frames in [-1, 1] to raw latents (N, z_dim, H/f, W/f)."""
        f = self.scale_factor_spatial
        if frames.shape[-1] % f or frames.shape[-2] % f:
            raise ValueError(f"frame height and width must be multiples of {f}, got {tuple(frames.shape[-2:])}")
        h = self.encoder(self.enc_in(frames))
        return self.enc_out(F.silu(self.enc_norm(h)))

    def decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode (N, z_dim, h, w) raw latents to (N, 3, h*f, w*f) frames."""
        h = self.decoder(self.dec_in(latents))
        return self.dec_out(F.silu(self.dec_norm(h)))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Encode a video (B, 3, T, H, W) in [-1, 1] to raw latents (B, z_dim, T, H/f, W/f)."""
        self._check_video(video, self.config.in_channels, "video")
        b, c, t, hh, ww = video.shape
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, hh, ww)
        z = self.encode_frames(frames)
        return z.reshape(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> AutoencoderOutput | tuple[torch.Tensor]:
        """Decode raw latents (B, z_dim, T, h, w) to a video (B, 3, T, h*f, w*f)."""
        self._check_video(latents, self.config.z_dim, "latents")
        b, c, t, hh, ww = latents.shape
        frames = self.decode_frames(latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, hh, ww))
        video = frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        if not return_dict:
            return (video,)
        return AutoencoderOutput(sample=video)

    def latent_stats(self, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) from the config as (1, z_dim, 1, 1, 1) tensors; zeros/ones if unset."""
        z = self.config.z_dim
        mean = self.config.latents_mean if self.config.latents_mean is not None else [0.0] * z
        std = self.config.latents_std if self.config.latents_std is not None else [1.0] * z
        shape = (1, z, 1, 1, 1)
        return (
            torch.tensor(mean, device=device, dtype=dtype).view(shape),
            torch.tensor(std, device=device, dtype=dtype).view(shape),
        )

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the DiT's normalised latent space."""
        mean, std = self.latent_stats(latents.device, latents.dtype)
        return (latents - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The DiT's normalised latents -> raw latents for `decode`."""
        mean, std = self.latent_stats(latents.device, latents.dtype)
        return latents * std + mean
