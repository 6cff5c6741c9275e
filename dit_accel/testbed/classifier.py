"""Attribute classifier / feature network of the testbed videos.

A small 3D-conv net (about 1.6 M parameters) that recognises the attributes of a testbed video
(:mod:`dit_accel.testbed.data`). Its penultimate features serve FID/KID and perceptual distances.

Any input size works: the video is first resized so its shorter side is ``ClassifierConfig.input_size`` pixels
(the generator's geometry is relative to the shorter side, so objects look the same at every size), and the
conv trunk ends in adaptive pooling over time and space.

Heads and the accuracy definition (:func:`attribute_accuracy`):

- ``background`` (6 classes) and ``count`` (1-3 objects): single-label; accuracy = argmax equals the label.
- ``shape``, ``color``, ``size``, ``motion`` and the bound pairs ``shape_color`` and ``shape_motion``:
  multi-label presence (sigmoid). For a video whose objects have ``k`` distinct values of an attribute, the
  prediction is the set of the ``k`` highest-scoring classes; the score is the share of the true values in that
  set, averaged over videos. Exactly ``k`` guesses are allowed, so predicting everything present cannot score:
  a ranking that ignores the video scores at chance level (k / classes on average).
- ``mean``: the mean of the ``shape``, ``color``, ``motion`` and ``background`` accuracies (the attributes the
  testbed's quality target names).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .captions import ATTRIBUTES, MAX_OBJECTS
from .data import COLOR_RGB, make_batch

__all__ = [
    "ClassifierConfig",
    "AttributeClassifier",
    "HEADS",
    "MULTI_LABEL_HEADS",
    "SINGLE_LABEL_HEADS",
    "head_targets",
    "classifier_loss",
    "accuracy_from_logits",
    "attribute_accuracy",
    "train_classifier",
    "save_classifier",
    "load_classifier",
]

_N = {a: len(v) for a, v in ATTRIBUTES.items()}

HEADS: dict[str, int] = {
    "background": _N["background"],
    "count": MAX_OBJECTS,
    "shape": _N["shape"],
    "color": _N["color"],
    "size": _N["size"],
    "motion": _N["motion"],
    "shape_color": _N["shape"] * _N["color"],
    "shape_motion": _N["shape"] * _N["motion"],
}
"""Output head name -> number of classes (``shape_color`` class = shape * n_colors + color, likewise motion)."""

SINGLE_LABEL_HEADS: tuple[str, ...] = ("background", "count")
"""Heads trained with softmax cross-entropy; the others are multi-label presence heads (sigmoid)."""

MULTI_LABEL_HEADS: tuple[str, ...] = tuple(h for h in HEADS if h not in SINGLE_LABEL_HEADS)
"""Presence heads: which values occur among the video's objects."""

MEAN_OF: tuple[str, ...] = ("shape", "color", "motion", "background")
"""Accuracies averaged into ``mean``."""


@dataclass
class ClassifierConfig:
    """Architecture of :class:`AttributeClassifier` (saved next to the weights as JSON)."""

    width: int = 32
    """Channels of the first conv stage; later stages use 2x, 3x and 4x."""
    feature_dim: int = 256
    """Size of the penultimate features returned by ``features()``."""
    input_size: int = 128
    """The video is resized so its shorter side has this many pixels before the conv trunk."""
    motion_summaries: bool = True
    """Feed per-colour motion summaries (displacement, bounce path, size change) to the projection."""
    background_summaries: bool = True
    """Feed background texture summaries (:data:`BACKGROUND_FEATURES`) to the projection."""
    min_frames: int = 4
    """Fewest frames accepted."""
    min_side: int = 32
    """Smallest frame side (pixels) accepted."""

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "input_size", "min_frames", "min_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be a positive int, got {value!r}")


def _conv(cin: int, cout: int, stride: tuple[int, int, int] | int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.SiLU()
    )


PALETTE_SIGMA: float = 0.1
"""Width (RGB distance in [0, 1] units) of the soft colour masks; the closest palette colours are 0.36 apart."""

TRACK_POINTS: int = 8
"""Time points of the per-colour tracks (centroid x, y and area of each palette colour's mask); five motion
summaries per colour (presence, displacement x/y, path beyond the displacement, size change) come with them."""

INPUT_CHANNELS: int = 3 + len(ATTRIBUTES["color"])
"""Trunk input: RGB and one soft mask per palette colour."""


BACKGROUND_FEATURES: int = 7
"""Texture summaries of the background (pixels away from palette-coloured objects): mean absolute band-pass
energy at four scales plus the large-scale variation (log), and the 2- and 4-fold orientation coherence of the
fine gradients (stripes: both high; checks: 4-fold only; dots and clouds: neither)."""


def _box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    # Separable box filter, normalised at the borders (equal to a k x k box with count_include_pad=False).
    x = F.avg_pool2d(x, (1, k), stride=1, padding=(0, k // 2), count_include_pad=False)
    return F.avg_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0), count_include_pad=False)


def _background_features(rgb01: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, BACKGROUND_FEATURES) from frames (B, 3, T, h, w) in [0, 1] and palette masks (B, C, T, h, w)."""
    b, _, t, h, w = rgb01.shape
    lum = rgb01.mean(dim=1).reshape(b * t, 1, h, w)
    near_object = F.max_pool2d(masks.amax(dim=1).reshape(b * t, 1, h, w), 7, stride=1, padding=3)
    weight = (1.0 - near_object).clamp(0.0, 1.0)
    wsum = weight.sum(dim=(2, 3)) + 1e-3
    scale = min(h, w) / 128.0
    levels = [lum] + [_box_blur(lum, max(3, 2 * round(k * scale / 2) + 1)) for k in (5, 11, 23, 47)]
    feats = [((a - c).abs() * weight).sum(dim=(2, 3)) / wsum for a, c in zip(levels[:-1], levels[1:])]
    coarse = levels[-1]
    mean = (coarse * weight).sum(dim=(2, 3), keepdim=True) / wsum[..., None, None]
    feats.append(((coarse - mean).abs() * weight).sum(dim=(2, 3)) / wsum)
    energies = torch.cat(feats, dim=1).clamp_min(1e-5).log() / 3.0
    g = levels[1]
    gx = F.pad(g[..., 2:] - g[..., :-2], (1, 1)) / 2
    gy = F.pad(g[..., 2:, :] - g[..., :-2, :], (0, 0, 1, 1)) / 2
    mag2 = gx * gx + gy * gy
    den = (mag2 * weight).sum(dim=(2, 3)) + 1e-9
    # (gx + i gy)^2 and ^4 / |g|^2 via real arithmetic: double and quadruple the gradient angle.
    c2, s2 = gx * gx - gy * gy, 2 * gx * gy
    c4, s4 = (c2 * c2 - s2 * s2) / (mag2 + 1e-12), (2 * c2 * s2) / (mag2 + 1e-12)
    z2 = torch.sqrt(((c2 * weight).sum(dim=(2, 3)) ** 2 + (s2 * weight).sum(dim=(2, 3)) ** 2)) / den
    z4 = torch.sqrt(((c4 * weight).sum(dim=(2, 3)) ** 2 + (s4 * weight).sum(dim=(2, 3)) ** 2)) / den
    return torch.cat([energies, z2, z4], dim=1).view(b, t, -1).mean(dim=1)


class AttributeClassifier(nn.Module):
    """3D-conv attribute classifier of testbed videos; see the module docstring for heads and accuracy.

    The trunk sees the frames and one soft mask per palette colour (fixed, from ``data.COLOR_RGB``); its last
    stage is mean- and max-pooled over time and space and concatenated with per-colour tracks (mask centroid
    and area at ``TRACK_POINTS`` times) before a two-layer projection to the features. The masks and tracks
    make colour, colour-shape binding and motion quick to learn, texture summaries of the background (see
    :data:`BACKGROUND_FEATURES`) the background; shapes come from the convs.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        w = self.config.width
        palette = torch.tensor([COLOR_RGB[c] for c in ATTRIBUTES["color"]], dtype=torch.float32)
        self.register_buffer("palette", palette.view(1, -1, 3, 1, 1, 1), persistent=False)
        self.trunk = nn.Sequential(
            _conv(INPUT_CHANNELS, w, (1, 2, 2)),
            _conv(w, 2 * w, (1, 2, 2)),
            _conv(2 * w, 2 * w, 1),
            _conv(2 * w, 3 * w, (2, 2, 2)),
            _conv(3 * w, 3 * w, 1),
            _conv(3 * w, 4 * w, (1, 2, 2)),
            _conv(4 * w, 4 * w, 1),
        )
        tracks = 3 * TRACK_POINTS * len(ATTRIBUTES["color"])
        tracks += 5 * len(ATTRIBUTES["color"]) if self.config.motion_summaries else 0
        tracks += BACKGROUND_FEATURES if self.config.background_summaries else 0
        self.project = nn.Sequential(
            nn.Linear(8 * w + tracks, self.config.feature_dim),
            nn.SiLU(),
            nn.Linear(self.config.feature_dim, self.config.feature_dim),
            nn.SiLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(self.config.feature_dim, n) for name, n in HEADS.items()})
        with torch.no_grad():
            for name in MULTI_LABEL_HEADS:
                # Start presence heads at the prior (about 1.85 objects a video), not at p = 0.5.
                p = min(0.5, 1.85 / HEADS[name])
                self.heads[name].bias.fill_(math.log(p / (1 - p)))

    def _prepare(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk input (B, INPUT_CHANNELS, T, h, w) at the internal size, and colour tracks (B, 3 * points * colours)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video (B, 3, T, H, W), got shape {tuple(video.shape)}")
        b, _, t, h, w = video.shape
        if t < self.config.min_frames or min(h, w) < self.config.min_side:
            raise ValueError(
                f"video of {t} frames of {h}x{w} px is too small: the classifier needs >= {self.config.min_frames} "
                f"frames and sides >= {self.config.min_side} px"
            )
        with torch.autocast(device_type=video.device.type, enabled=False):
            video = video.float()
            side = self.config.input_size
            size = (t, max(1, round(h * side / min(h, w))), max(1, round(w * side / min(h, w))))
            if (h, w) != size[1:]:
                # Area averaging when shrinking (anti-aliased), trilinear when enlarging.
                if min(h, w) > side:
                    video = F.interpolate(video, size=size, mode="area")
                else:
                    video = F.interpolate(video, size=size, mode="trilinear", align_corners=False)
            _, _, t, h, w = video.shape
            ys = torch.linspace(-1.0, 1.0, h, device=video.device).view(1, 1, 1, h, 1)
            xs = torch.linspace(-1.0, 1.0, w, device=video.device).view(1, 1, 1, 1, w)
            rgb01 = ((video + 1.0) * 0.5)[:, None]  # (B, 1, 3, T, h, w)
            masks = torch.exp(-((rgb01 - self.palette) ** 2).sum(dim=2) / (2 * PALETTE_SIGMA**2))  # (B, C, T, h, w)
            area = masks.mean(dim=(3, 4))  # (B, C, T)
            present = area / (area + 1e-3)  # ~1 where the colour is in the frame, so absent colours read 0
            cx = (masks * xs).mean(dim=(3, 4)) / (area + 1e-6) * present
            cy = (masks * ys).mean(dim=(3, 4)) / (area + 1e-6) * present
            size = area.sqrt()
            track = torch.stack([cx, cy, 10.0 * size], dim=2)  # (B, C, 3, T)
            # Motion summaries per colour: displacement first->last quarter, path length beyond the displacement
            # (bouncing), relative change of size (pulsing).
            q = max(1, t // 4)
            dx = cx[..., -q:].mean(-1) - cx[..., :q].mean(-1)
            dy = cy[..., -q:].mean(-1) - cy[..., :q].mean(-1)
            path = ((cx[..., 1:] - cx[..., :-1]).abs() + (cy[..., 1:] - cy[..., :-1]).abs()).sum(-1)
            pulse = size.std(dim=-1) / (size.mean(dim=-1) + 1e-3) * present.mean(-1)
            motion = torch.stack(
                [present.mean(-1), 3.0 * dx, 3.0 * dy, 3.0 * (path - dx.abs() - dy.abs()), 5.0 * pulse], dim=-1
            )
            parts = [F.adaptive_avg_pool1d(track.flatten(1, 2), TRACK_POINTS).flatten(1)]
            if self.config.motion_summaries:
                parts.append(motion.flatten(1))
            if self.config.background_summaries:
                parts.append(_background_features(rgb01[:, 0], masks))
            track = torch.cat(parts, dim=1)
            grid = torch.cat([video, 2.0 * masks - 1.0], dim=1)
        return grid, track

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim), float32, of videos (B, 3, T, H, W) in [-1, 1]."""
        grid, track = self._prepare(video)
        x = self.trunk(grid)
        pooled = torch.cat([x.mean(dim=(2, 3, 4)).float(), x.amax(dim=(2, 3, 4)).float(), track], dim=1)
        return self.project(pooled).float()

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head (see :data:`HEADS`), each (B, classes), float32."""
        feats = self.features(video)
        return {name: head(feats).float() for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------- targets


def head_targets(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets of every head from video labels (layout of ``VideoBatch.labels``).

    Single-label heads: LongTensor (B,) class indices (``count`` is 0-based). Multi-label heads: float
    multi-hot (B, classes)."""
    present = labels["shape"] >= 0  # (B, N)
    values = {
        "shape": labels["shape"],
        "color": labels["color"],
        "size": labels["size"],
        "motion": labels["motion"],
        "shape_color": labels["shape"] * _N["color"] + labels["color"],
        "shape_motion": labels["shape"] * _N["motion"] + labels["motion"],
    }
    out: dict[str, torch.Tensor] = {
        "background": labels["background"].long(),
        "count": (labels["count"] - 1).long(),
    }
    for name, v in values.items():
        hot = torch.zeros(v.shape[0], HEADS[name], device=v.device)
        # Added (absent slots add 0), then capped: two objects may share a value.
        hot.scatter_add_(1, v.clamp_min(0).long(), present.float())
        out[name] = hot.clamp_max(1.0)
    return out


PAIR_HEAD_WEIGHT: float = 0.5
"""Loss weight of the bound-pair heads (``shape_color``, ``shape_motion``), auxiliary to the attributes."""


def classifier_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Training loss: cross-entropy per single-label head plus, per multi-label head, the binary cross-entropy
    averaged over videos and classes times 8 (a sum over classes for 8-class heads; wider heads do not drown
    the others). Pair heads are weighted by :data:`PAIR_HEAD_WEIGHT`."""
    targets = head_targets(labels)
    loss = logits["background"].new_zeros(())
    for name in HEADS:
        if name in SINGLE_LABEL_HEADS:
            loss = loss + F.cross_entropy(logits[name], targets[name])
        else:
            term = 8.0 * F.binary_cross_entropy_with_logits(logits[name], targets[name])
            loss = loss + (PAIR_HEAD_WEIGHT * term if "_" in name else term)
    return loss


def accuracy_from_logits(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-head accuracies (definition in the module docstring) from precomputed logits."""
    targets = head_targets(labels)
    acc: dict[str, float] = {}
    for name in HEADS:
        if name in SINGLE_LABEL_HEADS:
            acc[name] = (logits[name].argmax(dim=1) == targets[name]).float().mean().item()
            continue
        truth = targets[name] > 0  # (B, C)
        k = truth.sum(dim=1)  # distinct true values per video, >= 1
        order = logits[name].argsort(dim=1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        chosen = rank < k[:, None]  # the k best-scoring classes
        acc[name] = ((chosen & truth).sum(dim=1).float() / k.clamp_min(1).float()).mean().item()
    acc["mean"] = sum(acc[n] for n in MEAN_OF) / len(MEAN_OF)
    return acc


@torch.no_grad()
def attribute_accuracy(
    model: AttributeClassifier, video: torch.Tensor, labels: dict[str, torch.Tensor], *, batch_size: int = 32
) -> dict[str, float]:
    """Accuracy of ``model`` on videos (B, 3, T, H, W) in [-1, 1] with their labels, per head and ``mean``.

    See the module docstring for the definition; ``labels`` may come from ``VideoBatch.labels`` or from
    ``captions.caption_labels(prompts)`` (the attributes a generation was prompted with).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunks = [model(video[i : i + batch_size].to(device)) for i in range(0, video.shape[0], batch_size)]
    model.train(was_training)
    logits = {name: torch.cat([c[name] for c in chunks]) for name in HEADS}
    return accuracy_from_logits(logits, {k: v.to(device) for k, v in labels.items()})


# --------------------------------------------------------------------------------------------- training


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


# ----------------------------------------------------------------------------------------------- saving


WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier_config.json"


def save_classifier(model: AttributeClassifier, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``classifier.safetensors`` (weights in ``dtype``; float16 halves the file) and
    ``classifier_config.json`` into ``folder``."""
    from safetensors.torch import save_file

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> AttributeClassifier:
    """Load a classifier saved by :func:`save_classifier` (offline), in eval mode on ``device``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found; save_classifier() writes {WEIGHTS_NAME} and {CONFIG_NAME}")
    fields = json.loads((folder / CONFIG_NAME).read_text())
    # Configs saved before the summaries existed describe a model without them.
    fields.setdefault("motion_summaries", False)
    fields.setdefault("background_summaries", False)
    config = ClassifierConfig(**fields)
    model = AttributeClassifier(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()
