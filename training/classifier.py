"""Training of the testbed's attribute classifier (:class:`dit_accel.testbed.classifier.AttributeClassifier`).

Not installed with the package: the runtime keeps the classifier's inference (features, accuracy, loading);
this module trains it on fresh videos of the procedural generator (``dit_accel.testbed.data.make_batch``).
``training/train_testbed.py --stage classifier`` runs it on a GPU and saves the weights.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from dit_accel.testbed.classifier import (
    HEADS,
    SINGLE_LABEL_HEADS,
    AttributeClassifier,
    ClassifierConfig,
    accuracy_from_logits,
    head_targets,
)
from dit_accel.testbed.data import make_batch

__all__ = ["DEFAULT_SIZES", "PAIR_HEAD_WEIGHT", "classifier_loss", "train_classifier"]


PAIR_HEAD_WEIGHT: float = 0.5
"""Loss weight of the bound-pair heads relative to the single attributes."""


def classifier_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Training loss: cross-entropy per single-label head plus, per multi-label head, the binary cross-entropy
    summed over classes and averaged over videos; pair heads (which carry the per-colour-slot supervision) are
    weighted by :data:`PAIR_HEAD_WEIGHT`."""
    targets = head_targets(labels)
    loss = logits["background"].new_zeros(())
    for name in HEADS:
        if name in SINGLE_LABEL_HEADS:
            loss = loss + F.cross_entropy(logits[name], targets[name])
        else:
            term = F.binary_cross_entropy_with_logits(logits[name], targets[name], reduction="sum")
            term = term / logits[name].shape[0]
            loss = loss + (PAIR_HEAD_WEIGHT * term if "_" in name else term)
    return loss




DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((8, 128), (16, 128), (8, 256), (16, 256))
"""(frames, side) of the training batches, used in turn."""


def _augment(video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur and noise on half of the videos, so generated (imperfect) videos are still recognised."""
    b = video.shape[0]
    dev = video.device
    u = torch.rand(b, 3, generator=generator, device=generator.device).to(dev)
    blurred = F.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    use_blur = (u[:, 0] < 0.3).view(b, 1, 1, 1, 1)
    video = torch.where(use_blur, blurred, video)
    sigma = (u[:, 1] * 0.12 * (u[:, 2] < 0.5)).view(b, 1, 1, 1, 1)
    noise = torch.randn(video.shape, generator=generator, device=generator.device).to(dev)
    return (video + sigma * noise).clamp(-1.0, 1.0)


def train_classifier(
    steps: int,
    batch_size: int,
    device: str | torch.device,
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    log_every: int = 50,
    *,
    max_seconds: float | None = None,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    seed: int = 0,
    config: ClassifierConfig | None = None,
    verbose: bool = True,
) -> tuple[AttributeClassifier, list[dict[str, float]]]:
    """Train an :class:`AttributeClassifier` on fresh ``make_batch`` training data.

    Stops after ``steps`` steps or ``max_seconds`` seconds, whichever comes first; the learning rate follows the
    progress towards that end (the larger of the step and time fractions): linear warm-up over the first
    ``warmup`` fraction, then cosine decay to 0. ``sizes``: (frames, side) pairs cycled over the steps (square
    frames). AdamW, bf16 autocast on CUDA, mild blur/noise augmentation. Returns the model (eval mode) and a log:
    one dict per ``log_every`` steps with ``step``, ``loss`` (mean since the last entry), ``seconds``, ``lr`` and
    the last training batch's accuracies (``acc_<head>``, ``acc_mean``).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    if not sizes:
        raise ValueError("sizes must hold at least one (frames, side) pair")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds}")
    device = torch.device(device)
    torch.manual_seed(seed)
    model = AttributeClassifier(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))

    def lr_factor(progress: float) -> float:
        if progress < warmup:
            return max(progress / warmup, 0.02)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))))

    # Scene parameters come from a CPU generator (no device syncs); rendering runs on ``device``.
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed + 1)
    use_bf16 = device.type == "cuda"
    log: list[dict[str, float]] = []
    running, counted = 0.0, 0
    start = time.time()
    step = 0
    while True:
        progress = step / steps
        if max_seconds is not None:
            progress = max(progress, (time.time() - start) / max_seconds)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(progress)
        frames, side = sizes[step % len(sizes)]
        batch = make_batch(batch_size, frames, side, side, generator=data_gen, device=device)
        video = _augment(batch.video, noise_gen)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(video)
        loss = classifier_loss(logits, batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        running += loss.item()
        counted += 1
        if step % log_every == 0:
            acc = accuracy_from_logits({k: v.detach() for k, v in logits.items()}, batch.labels)
            entry = {"step": step, "loss": running / counted, "seconds": time.time() - start,
                     "lr": optimizer.param_groups[0]["lr"]}
            entry.update({f"acc_{k}": v for k, v in acc.items()})
            log.append(entry)
            running, counted = 0.0, 0
            if verbose:
                print(
                    f"classifier step {step} loss {entry['loss']:.4f} acc mean {acc['mean']:.3f} "
                    f"(shape {acc['shape']:.2f} color {acc['color']:.2f} motion {acc['motion']:.2f} "
                    f"background {acc['background']:.2f}) {entry['seconds']:.0f}s",
                    flush=True,
                )
    model.eval()
    return model, log
