"""Training of the testbed: autoencoder first, then the DiT + text encoder by rectified flow.

All loops are bounded by wall-clock seconds (the GPU lease is counted in time, not steps) and draw
fresh videos from `data.make_batch` every step: nothing is stored. `training/train_testbed.py`
is the command-line entry; these functions are importable so tests can run a few CPU steps.

Rectified flow (as diffusers' FlowMatchEulerDiscreteScheduler samples it):
    x_t = (1 - sigma) * x_0 + sigma * noise,   target v = noise - x_0,   timestep = 1000 * sigma,
sigma drawn logit-normal and shifted like the scheduler: sigma = s u / (1 + (s - 1) u), mixed with a share
drawn uniformly from a high-noise range (`DiTTrainConfig.high_sigma_share`): where objects are placed and
which way they go is decided in the first sampling steps (sigma > ~0.95), which the shifted logit-normal
alone visits in ~3 % of training samples.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dit_accel.testbed import captions, data
from dit_accel.testbed.autoencoder import TestbedAutoencoder
from dit_accel.testbed.pipeline import TestbedPipeline

# ----------------------------------------------------------------------------------------- utilities


def log_line(path: Path | None, record: dict[str, Any]) -> None:
    """Append one JSON line to the loss log and echo it."""
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(line + "\n")


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing on CPU (CPU runs are tests)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@contextmanager
def fast_attention(device: torch.device) -> Iterator[None]:
    """cuDNN attention first, then FA2, on CUDA (the text encoder's masked attention falls back to the
    memory-efficient kernel); nothing changes on CPU."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        yield


def lr_at(step: int, elapsed_s: float, *, base_lr: float, warmup_steps: int, total_s: float,
          decay_from: float = 0.6, final_ratio: float = 0.1, warmup_start: int = 0) -> float:
    """Linear warm-up over `warmup_steps` from step `warmup_start`, constant, then cosine from
    `decay_from * total_s` to `final_ratio * base_lr` at `total_s` (time-based, so it survives resumes)."""
    warm = min(1.0, (step - warmup_start + 1) / max(1, warmup_steps))
    start = decay_from * total_s
    if elapsed_s <= start or total_s <= start:
        return base_lr * warm
    p = min(1.0, (elapsed_s - start) / (total_s - start))
    return base_lr * warm * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of parameters (fp32 shadow), decay warmed up as (1+n)/(10+n)."""

    def __init__(self, modules: Sequence[torch.nn.Module], max_decay: float = 0.999) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.max_decay = max_decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow toward the current parameters."""
        self.updates += 1
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, modules: Sequence[torch.nn.Module]) -> None:
        """Write the shadow into modules of the same structure."""
        targets = [p for m in modules for p in m.parameters()]
        for t, s in zip(targets, self.shadow, strict=True):
            t.copy_(s.to(t.dtype))

    def state_dict(self) -> dict[str, Any]:
        """Shadow tensors and update count."""
        return {"shadow": self.shadow, "updates": self.updates, "max_decay": self.max_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        for s, v in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(v)
        self.updates = int(state["updates"])


# ----------------------------------------------------------------------------------------- autoencoder


@dataclass
class AutoencoderTrainConfig:
    """Autoencoder training knobs."""

    seconds: float = 120.0
    """Wall-clock budget."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    sizes: tuple[tuple[int, int, int], ...] = ((16, 4, 256), (32, 4, 128))
    """(videos, frames, side) batches, alternated; frames are encoded independently."""
    latent_noise: float = 0.1
    """Gaussian noise added to the latents before decoding, relative to their std: the decoder
    learns to tolerate the small errors of generated latents, and the latent space stays smooth."""
    log_every: int = 50
    """Steps between log lines."""
    max_steps: int | None = None
    """Optional step cap (tests)."""


def train_autoencoder(ae: TestbedAutoencoder, cfg: AutoencoderTrainConfig, device: torch.device,
                      log_path: Path | None = None, seed: int = 0) -> dict[str, float]:
    """Train the autoencoder in place on fresh generator frames; returns final metrics."""
    ae.to(device).train()
    if device.type == "cuda":
        ae.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    step, run_loss, run_psnr = 0, 0.0, 0.0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= cfg.seconds or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        b, t, s = cfg.sizes[step % len(cfg.sizes)]
        video = data.make_batch(b, t, s, s, generator=gen, device=device).video
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * t, 3, s, s)
        if device.type == "cuda":
            frames = frames.contiguous(memory_format=torch.channels_last)
        lr = lr_at(step, elapsed, base_lr=cfg.lr, warmup_steps=100, total_s=cfg.seconds, decay_from=0.3)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device):
            z = ae.encode_frames(frames)
            z_noisy = z + cfg.latent_noise * z.detach().float().std() * torch.randn_like(z)
            rec = ae.decode_frames(z_noisy)
        rec = rec.float()
        mse = F.mse_loss(rec, frames)
        loss = F.l1_loss(rec, frames) + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item() if step % 10 == 0 or cfg.max_steps else 0.0
        if step % cfg.log_every == 0 or (cfg.max_steps is not None and step >= cfg.max_steps):
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # range [-1, 1] -> peak-to-peak 2
            log_line(log_path, {"stage": "ae", "step": step, "elapsed_s": round(time.perf_counter() - t0, 2),
                                "loss": round(loss.item(), 5), "psnr_db": round(psnr, 2), "lr": lr,
                                "side": s})
            run_psnr = psnr
    ae.eval()
    return {"ae_steps": step, "ae_seconds": round(time.perf_counter() - t0, 1), "ae_last_psnr_db": round(run_psnr, 2)}


@torch.no_grad()
def set_latent_stats(ae: TestbedAutoencoder, device: torch.device, videos: int = 32, seed: int = 1) -> None:
    """Measure per-channel latent mean/std on fresh videos and store them in the config."""
    ae.eval()
    chunks = []
    for i in range(videos // 8):
        video = data.make_batch(8, 8, 256, 256, seed=seed + i, device=device).video
        with autocast(device):
            chunks.append(ae.encode(video).float())
    z = torch.cat(chunks).transpose(0, 1).reshape(ae.config.z_dim, -1)
    ae.register_to_config(latents_mean=z.mean(1).tolist(), latents_std=z.std(1).clamp_min(1e-4).tolist())


@torch.no_grad()
def reconstruction_psnr(ae: TestbedAutoencoder, device: torch.device, seed: int = 12345) -> float:
    """PSNR (dB, range [-1, 1]) of autoencoder reconstructions of 8 held-out 256x256x8 videos."""
    video = data.make_batch(8, 8, 256, 256, seed=seed, split="heldout", device=device).video
    with autocast(device):
        rec = ae.decode(ae.encode(video)).sample.float().clamp(-1, 1)
    return 10 * math.log10(4.0 / F.mse_loss(rec, video).item())


# ----------------------------------------------------------------------------------------------- DiT


@dataclass
class DiTTrainConfig:
    """DiT (+ text encoder) training knobs."""

    seconds: float = 300.0
    """Wall-clock budget of this training call (one GPU lease; training resumes across calls)."""
    total_seconds: float = 840.0
    """Planned training time over all calls (the LR schedule and the size curriculum follow it)."""
    lr: float = 4e-4
    """Peak AdamW learning rate."""
    warmup_steps: int = 300
    """Linear warm-up steps (re-done, shorter, when resuming without optimizer state)."""
    ema_decay: float = 0.999
    """Largest EMA decay."""
    text_dropout: float = 0.1
    """Share of captions replaced by "" so the model learns the unconditional branch (CFG)."""
    shift: float = 3.0
    """Timestep shift of the sigma distribution (same as the sampling scheduler's)."""
    high_sigma_share: float = 0.3
    """Share of samples whose sigma is drawn uniformly from `high_sigma_range` instead of the shifted
    logit-normal (see `sample_sigmas`); 0 is the logit-normal alone. At 0.3, 14 % of samples lie above sigma 0.95
    instead of 3 %: where objects are placed and which way they move is decided there. The shipped weights'
    `training_info.json` records the share of each call."""
    high_sigma_range: tuple[float, float] = (0.85, 1.0)
    """(low, high) of the uniform high-noise component."""
    direction_contrast: float = 0.0
    """Weight of the direction-contrastive term (`direction_contrast_loss`; 0: off, as for the shipped weights). Each step
    it takes up to a quarter of the batch whose captions name a direction, noises them at a sigma drawn from
    `high_sigma_range`, and asks the object-pixel loss with every direction word reversed to exceed the loss with
    the true caption by `direction_contrast_margin` (relative). Costs two more forward/backward passes of those
    videos. At 1.0 the loss comes to use the direction words, but the sampled motion does not follow them
    (training/REPORT.md)."""
    direction_contrast_margin: float = 0.02
    """Relative gap (reversed / true - 1) above which the contrastive term stops pushing."""
    buckets: tuple[tuple[int, int, int], ...] = (
        (128, 8, 32), (128, 16, 16), (192, 12, 8), (256, 8, 8), (256, 16, 4), (256, 32, 2))
    """(side px, frames, batch) shapes; each about 55-65K tokens a step."""
    curriculum: tuple[tuple[float, tuple[float, ...]], ...] = (
        (0.25, (0.5, 0.2, 0.2, 0.1, 0.0, 0.0)),
        (0.6, (0.25, 0.15, 0.2, 0.15, 0.25, 0.0)),
        (1.01, (0.2, 0.1, 0.15, 0.1, 0.4, 0.05)),
    )
    """(progress upper bound, bucket probabilities): small/short clips early, eval size later."""
    validation_size: tuple[int, int] = (256, 16)
    """(side, frames) of the validation loss at the end of each call (held-out captions, fixed noise)."""
    log_every: int = 25
    """Steps between log lines."""
    checkpoint_every_s: float = 150.0
    """Seconds between checkpoints."""
    max_steps: int | None = None
    """Optional step cap (tests)."""


@dataclass
class DiTState:
    """Progress carried across training calls."""

    step: int = 0
    """Optimizer steps done."""
    elapsed_s: float = 0.0
    """Training seconds done (all calls)."""
    samples: int = 0
    """Videos seen."""
    tokens: int = 0
    """Video tokens seen."""
    sessions: list[dict[str, Any]] = field(default_factory=list)
    """One summary per training call (key ``sessions`` in ``training_info.json``)."""


def pick_bucket(cfg: DiTTrainConfig, progress: float, rng: random.Random) -> tuple[int, int, int]:
    """Draw a (side, frames, batch) bucket by the curriculum at `progress` in [0, 1]."""
    for bound, probs in cfg.curriculum:
        if progress < bound:
            return rng.choices(cfg.buckets, weights=probs, k=1)[0]
    return cfg.buckets[-1]


def sample_sigmas(n: int, shift: float, device: torch.device, generator: torch.Generator | None = None, *,
                  high_share: float = 0.0, high_range: tuple[float, float] = (0.85, 1.0)) -> torch.Tensor:
    """Sigmas in (0, 1): logit-normal shifted like FlowMatchEulerDiscreteScheduler(shift), except a
    `high_share` of them (Bernoulli per sample) drawn uniformly from `high_range`."""
    if not 0.0 <= high_share <= 1.0:
        raise ValueError(f"high_share must be in [0, 1], got {high_share}")
    low, high = high_range
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"high_range must satisfy 0 <= low < high <= 1, got {high_range}")
    u = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    sigmas = shift * u / (1 + (shift - 1) * u)
    if high_share == 0.0:
        return sigmas  # the same draws as before the share existed, so resumed runs stay reproducible
    pick = torch.rand(n, generator=generator, device=device) < high_share
    return torch.where(pick, uniform_sigmas(n, high_range, device, generator), sigmas).clamp_max(1.0 - 1e-4)


def uniform_sigmas(n: int, sigma_range: tuple[float, float], device: torch.device,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` sigmas uniform in `sigma_range` = (low, high) (the high-noise component of `sample_sigmas`)."""
    low, high = sigma_range
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def velocity_error(pipe: TestbedPipeline, latents: torch.Tensor, caption_list: list[str], sigmas: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Squared error (float32, shape of the latents) of the transformer's rectified-flow velocity on normalised
    latents (B, C, T, h, w) noised to `sigmas` with `noise`."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * latents + s * noise
    text = pipe.encode_text(caption_list, latents.device)
    pred = pipe.transformer(hidden_states=x_t, timestep=sigmas * 1000, encoder_hidden_states=text,
                            return_dict=False)[0]
    return (pred.float() - (noise - latents).float()) ** 2


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None = None, *, per_sample: bool = False) -> torch.Tensor:
    """Mean of `err`; with `weight` (broadcastable to it, e.g. (B, 1, T, h, w)), the weighted mean. With
    `per_sample`, one mean per leading index (shape (B,))."""
    dims = tuple(range(1, err.dim())) if per_sample else tuple(range(err.dim()))
    if weight is None:
        return err.mean(dim=dims)
    w = weight.to(err.dtype).expand_as(err)
    return (err * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-8)


def flow_matching_loss(pipe: TestbedPipeline, latents: torch.Tensor, caption_list: list[str],
                       sigmas: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow MSE of the transformer's velocity on normalised latents (B, C, T, h, w); with `weight`,
    the weighted mean (see `weighted_mean`)."""
    return weighted_mean(velocity_error(pipe, latents, caption_list, sigmas, noise), weight)


@torch.no_grad()
def encode_videos(ae: TestbedAutoencoder, video: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalised float32 latents of pixel videos."""
    with autocast(device):
        z = ae.encode(video)
    return ae.normalize(z.float())


VALIDATION_SIGMAS: tuple[float, ...] = (0.2, 0.5, 0.8)
"""Sigmas of the monitoring loss `val_loss`, one per held-out video (fixed, so every training call's loss
compares with the others')."""

VALIDATION_HIGH_SIGMAS: tuple[float, ...] = (0.95, 0.98)
"""Sigmas where the sampler decides where objects go: the direction-word sensitivity is also read here."""


@torch.no_grad()
def validation_losses(pipe: TestbedPipeline, device: torch.device, side: int = 256, frames: int = 16
                      ) -> dict[str, float]:
    """Monitoring losses on a fixed held-out batch (fixed noise), each with the true captions and with every
    direction word reversed (equal when the model ignores direction words; ``training/text_probe.py`` measures
    the same on more captions and words).

    Returns ``val_loss`` / ``val_loss_reversed`` (video i at sigma ``VALIDATION_SIGMAS[i]``: the monitoring loss
    of every training call), ``val_high_loss`` / ``val_high_loss_reversed`` (every video at each of
    :data:`VALIDATION_HIGH_SIGMAS`, averaged, on object pixels only: the background carries no direction), and
    the two sensitivities ``val_direction_sensitivity`` / ``val_high_direction_sensitivity`` (reversed / true - 1).
    """
    batch = data.make_batch(len(VALIDATION_SIGMAS), frames, side, side, seed=777, split="heldout", device=device)
    lat = encode_videos(pipe.vae, batch.video, device)
    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn(lat.shape, generator=g, device=device)
    reversed_captions = [captions.reverse_directions(c) for c in batch.captions]
    weight = object_weight(batch.object_mask, batch.video.shape[-1] // lat.shape[-1])
    n = lat.shape[0]
    out: dict[str, float] = {}
    with autocast(device), fast_attention(device):
        for suffix, caps in (("", batch.captions), ("_reversed", reversed_captions)):
            out["val_loss" + suffix] = flow_matching_loss(
                pipe, lat, caps, torch.tensor(VALIDATION_SIGMAS, device=device), noise).item()
            high = [flow_matching_loss(pipe, lat, caps, torch.full((n,), s, device=device), noise, weight=weight).item()
                    for s in VALIDATION_HIGH_SIGMAS]
            out["val_high_loss" + suffix] = sum(high) / len(high)
    out["val_direction_sensitivity"] = out["val_loss_reversed"] / out["val_loss"] - 1.0
    out["val_high_direction_sensitivity"] = out["val_high_loss_reversed"] / out["val_high_loss"] - 1.0
    return out


def object_weight(object_mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 1, T, H, W) pixel coverage -> (B, 1, T, H/factor, W/factor) 0/1 latent mask of where any object
    touches a latent pixel (max-pooled)."""
    pooled = F.max_pool3d(object_mask, (1, factor, factor))
    return (pooled > 0.01).float()


def direction_contrast_loss(pipe: TestbedPipeline, latents: torch.Tensor, caption_list: list[str],
                            weight: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor,
                            margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hinge on the direction-word gap: mean over videos of ``relu(margin - (l_rev / l_true - 1))``, where
    ``l_true`` / ``l_rev`` are a video's object-pixel losses (`weight`, (B, 1, T, h, w)) with its caption and with
    every direction word reversed. Zero once reversing the directions costs at least `margin` of the loss; below
    that its gradient lowers ``l_true`` and raises ``l_rev``, i.e. makes the prediction follow the direction word.
    Returns (loss, mean gap). Captions must name a direction (see `has_direction`)."""
    reversed_captions = [captions.reverse_directions(c) for c in caption_list]
    true, rev = (weighted_mean(velocity_error(pipe, latents, caps, sigmas, noise), weight, per_sample=True)
                 for caps in (caption_list, reversed_captions))
    gap = rev / true.detach() - true / true.detach()  # value rev/true - 1; gradient through both losses
    return torch.relu(margin - gap).mean(), gap.detach().mean()


def has_direction(caption: str) -> bool:
    """Whether a caption names a direction (reversing its directions changes it)."""
    return captions.reverse_directions(caption) != caption


def save_checkpoint(path: Path, pipe: TestbedPipeline, ema: EMA, opt: torch.optim.Optimizer, state: DiTState,
                    rng: random.Random, data_gen: torch.Generator) -> None:
    """Full training state (models, EMA, optimizer, progress, RNG) to one file."""
    tmp = path.with_suffix(".tmp")
    torch.save({
        "transformer": pipe.transformer.state_dict(), "text_encoder": pipe.text_encoder.state_dict(),
        "ema": ema.state_dict(), "optimizer": opt.state_dict(), "state": asdict(state),
        "py_rng": rng.getstate(), "data_gen": data_gen.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, pipe: TestbedPipeline, ema: EMA, opt: torch.optim.Optimizer,
                    rng: random.Random, data_gen: torch.Generator) -> DiTState:
    """Restore what `save_checkpoint` wrote; returns the progress."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    pipe.transformer.load_state_dict(ck["transformer"])
    pipe.text_encoder.load_state_dict(ck["text_encoder"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["optimizer"])
    rng.setstate(ck["py_rng"])
    data_gen.set_state(ck["data_gen"])
    torch.set_rng_state(ck["torch_rng"])
    if ck["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["cuda_rng"])
    return DiTState(**ck["state"])


def train_dit(pipe: TestbedPipeline, cfg: DiTTrainConfig, device: torch.device, *, state: DiTState | None = None,
              checkpoint: Path | None = None, resume_full: bool = False, log_path: Path | None = None,
              seed: int = 0, on_checkpoint: Callable[[EMA, DiTState], None] | None = None) -> tuple[DiTState, EMA]:
    """Train transformer + text encoder in place for `cfg.seconds`; returns progress and the EMA.

    With `resume_full` and an existing `checkpoint`, the optimizer, EMA and RNG states are restored;
    otherwise training starts from the pipeline's current weights with a fresh optimizer (EMA = weights).
    """
    pipe.transformer.to(device).train()
    pipe.text_encoder.to(device).train()
    pipe.vae.to(device).eval().requires_grad_(False)
    modules = [pipe.transformer, pipe.text_encoder]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    ema = EMA(modules, cfg.ema_decay)
    rng = random.Random(seed)
    data_gen = torch.Generator().manual_seed(seed)
    state = state or DiTState()
    warmup, warmup_start = cfg.warmup_steps, 0
    if resume_full and checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, pipe, ema, opt, rng, data_gen)
        print(f"resumed full state from {checkpoint} at step {state.step}", flush=True)
    elif state.step > 0:
        # Weights-only resume (no optimizer state travelled): a short re-warm-up protects Adam's moments.
        warmup, warmup_start = 100, state.step
        rng.seed(seed + state.step)
        data_gen.manual_seed(seed + state.step)
        print(f"weights-only resume at step {state.step}: fresh AdamW, re-warm-up 100 steps", flush=True)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1 + state.step)
    session_start_step, session_t0 = state.step, time.perf_counter()
    wall0 = last_ck = session_t0  # wall0: this call's budget; session_t0: time not yet added to state
    losses: list[float] = []
    gaps: list[torch.Tensor] = []  # direction gaps of the contrastive term, between log lines
    bucket_counts: dict[str, int] = {}
    while True:
        now = time.perf_counter()
        if now - wall0 >= cfg.seconds or (cfg.max_steps is not None and state.step - session_start_step >= cfg.max_steps):
            break
        elapsed = state.elapsed_s + (now - session_t0)
        progress = min(1.0, elapsed / cfg.total_seconds)
        side, frames, batch_size = pick_bucket(cfg, progress, rng)
        batch = data.make_batch(batch_size, frames, side, side, generator=data_gen, device=device)
        caption_list = ["" if rng.random() < cfg.text_dropout else c for c in batch.captions]
        latents = encode_videos(pipe.vae, batch.video, device)
        sigmas = sample_sigmas(batch_size, cfg.shift, device, noise_gen, high_share=cfg.high_sigma_share,
                               high_range=cfg.high_sigma_range)
        noise = torch.randn(latents.shape, generator=noise_gen, device=device)
        lr = lr_at(state.step, elapsed, base_lr=cfg.lr, warmup_steps=warmup, total_s=cfg.total_seconds,
                   warmup_start=warmup_start)
        for group in opt.param_groups:
            group["lr"] = lr
        with autocast(device), fast_attention(device):
            loss = flow_matching_loss(pipe, latents, caption_list, sigmas, noise)
            total = loss
            picked = ([i for i, c in enumerate(caption_list) if has_direction(c)][: max(1, batch_size // 4)]
                      if cfg.direction_contrast > 0 else [])
            if picked:
                idx = torch.tensor(picked, device=device)
                sig_c = uniform_sigmas(len(picked), cfg.high_sigma_range, device, noise_gen)
                contrast, gap = direction_contrast_loss(
                    pipe, latents[idx], [caption_list[i] for i in picked],
                    object_weight(batch.object_mask[idx], side // latents.shape[-1]), sig_c.clamp_max(1.0 - 1e-4),
                    noise[idx], cfg.direction_contrast_margin)
                total = loss + cfg.direction_contrast * contrast
                gaps.append(gap)
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        state.step += 1
        state.samples += batch_size
        tok = batch_size * frames * (side // 8) ** 2
        state.tokens += tok
        losses.append(loss.detach())
        if state.step % cfg.log_every == 0:
            mean_loss = torch.stack(losses).mean().item()
            losses.clear()
            t_now = time.perf_counter()
            extra = {"direction_gap": round(torch.stack(gaps).mean().item(), 5)} if gaps else {}
            gaps.clear()
            log_line(log_path, {"stage": "dit", "step": state.step, "elapsed_s": round(state.elapsed_s + t_now - session_t0, 1),
                                "loss": round(mean_loss, 5), "lr": round(lr, 7), "grad_norm": round(float(grad_norm), 3),
                                "bucket": f"{side}x{frames}x{batch_size}", "samples": state.samples,
                                "tokens": state.tokens, **extra})
        if checkpoint is not None and time.perf_counter() - last_ck > cfg.checkpoint_every_s:
            state.elapsed_s += time.perf_counter() - session_t0
            session_t0 = time.perf_counter()
            save_checkpoint(checkpoint, pipe, ema, opt, state, rng, data_gen)
            last_ck = time.perf_counter()
            if on_checkpoint is not None:
                on_checkpoint(ema, state)
        key = f"{side}x{frames}x{batch_size}"
        bucket_counts[key] = bucket_counts.get(key, 0) + 1
    state.elapsed_s += time.perf_counter() - session_t0
    val = validation_losses(pipe, device, *cfg.validation_size)
    # The *_direction_sensitivity entries are > 0 once the model uses the direction words (motion), 0 while it
    # ignores them.
    summary = {"steps": state.step - session_start_step, "end_step": state.step, "elapsed_s": round(state.elapsed_s, 1),
               "val_size": list(cfg.validation_size), "bucket_counts": bucket_counts,
               "high_sigma_share": cfg.high_sigma_share, "direction_contrast": cfg.direction_contrast,
               **{k: round(v, 5) for k, v in val.items()}}
    state.sessions.append(summary)
    log_line(log_path, {"stage": "dit_session", **summary})
    if checkpoint is not None:
        save_checkpoint(checkpoint, pipe, ema, opt, state, rng, data_gen)
    pipe.transformer.eval()
    pipe.text_encoder.eval()
    return state, ema


def export_pipeline(pipe: TestbedPipeline, ema: EMA | None, folder: Path, *, dtype: torch.dtype = torch.float16,
                    info: dict[str, Any] | None = None) -> None:
    """Save a copy of the pipeline with the EMA weights in `dtype` (shards <= 15 MB) + `training_info.json`.

    `pipe` itself is not changed (a CPU copy is written), so this can run in the middle of training.
    """
    folder.mkdir(parents=True, exist_ok=True)
    copy_pipe = TestbedPipeline(
        transformer=copy.deepcopy(pipe.transformer).to("cpu"), vae=copy.deepcopy(pipe.vae).to("cpu"),
        text_encoder=copy.deepcopy(pipe.text_encoder).to("cpu"), scheduler=pipe.scheduler,
    )
    if ema is not None:
        ema.copy_to([copy_pipe.transformer, copy_pipe.text_encoder])
    for name in ("transformer", "text_encoder", "vae"):
        getattr(copy_pipe, name).to(dtype)
    copy_pipe.save_pretrained(str(folder), safe_serialization=True, max_shard_size="15MB")
    if info is not None:
        (folder / "training_info.json").write_text(json.dumps(info, indent=2, default=str))


def read_training_info(folder: Path) -> dict[str, Any]:
    """`training_info.json` of an exported folder ({} if absent)."""
    path = folder / "training_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def vocab() -> tuple[str, ...]:
    """The grammar's vocabulary (what a fresh text encoder learns)."""
    return captions.VOCAB
