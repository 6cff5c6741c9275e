"""Attribute classifier / feature network of the testbed videos.

A small network (about 0.67 M parameters, 1.3 MB in fp16) that recognises the attributes of a testbed video
(:mod:`dit_accel.testbed.data`). Its penultimate features serve FID/KID and perceptual distances.

Any input size works: the video is first resized so its shorter side is ``ClassifierConfig.input_size`` pixels
(the generator's geometry is relative to the shorter side, so objects look the same at every size).

Architecture: the generator draws objects in a fixed palette (``data.COLOR_RGB``) on dark, desaturated
backgrounds, so the net works per palette colour ("slots"). A soft mask per colour separates each object from
the others and from the background texture; every slot gets

- a shape code: a small 2D conv net, shared by the colours, on the colour's mask at a few frames, max-pooled over
  space (so two objects of one colour both register) and averaged over the frames;
- a track: centroid and area of the mask over time plus motion summaries (displacement, path beyond the
  displacement for bounces, size change for pulsing).

Two small MLPs shared by the colours turn each slot into an embedding (one half from shape code and track, for
shape and size; one half from the track alone, for motion). One linear map per attribute gives per-slot logits
(colour present; shape, motion, size of the object(s) of that colour); presence of a value in the video is the
maximum over the slots, the pair heads read the slot logits directly.
The background has its own conv branch on RGB + an object mask, plus texture summaries
(:data:`BACKGROUND_FEATURES`). ``features()`` is the concatenation of the slot and background embeddings and a
global summary; every head is a function of it (``heads[name](features)``).

Why colour slots: one pooled vector over the whole scene would have to untangle 1-3 objects, a textured
background and the motion at once; a conv net on one colour's mask learns shapes quickly (with batch norm), and
an MLP on one colour's track separates the 10 motions. Known limit: two objects of the same colour share a slot
(their tracks mix), the main source of the remaining motion errors. Training: ``training/classifier.py`` (not
installed with the package).

Heads and the accuracy definition (:func:`attribute_accuracy`):

- ``background`` (6 classes) and ``count`` (1-3 objects): single-label; accuracy = argmax equals the label.
- ``shape``, ``color``, ``size``, ``motion`` and the bound pairs ``shape_color``, ``shape_motion``,
  ``color_motion`` and ``color_size``: multi-label presence (sigmoid). For a video whose objects have ``k``
  distinct values of an attribute, the prediction is the set of the ``k`` highest-scoring classes; the score is
  the share of the true values in that set, averaged over videos. Exactly ``k`` guesses are allowed, so
  predicting everything present cannot score: a ranking that ignores the video scores at chance level
  (k / classes on average).
- ``mean``: the mean of the ``shape``, ``color``, ``motion`` and ``background`` accuracies (the attributes the
  testbed's quality target names).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .captions import ATTRIBUTES, MAX_OBJECTS
from .data import COLOR_RGB

__all__ = [
    "ClassifierConfig",
    "AttributeClassifier",
    "HEADS",
    "MULTI_LABEL_HEADS",
    "SINGLE_LABEL_HEADS",
    "head_targets",
    "accuracy_from_logits",
    "attribute_accuracy",
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
    "color_motion": _N["color"] * _N["motion"],
    "color_size": _N["color"] * _N["size"],
}
"""Output head name -> number of classes. Pair classes: ``shape_color`` = shape * n_colors + color,
``shape_motion`` = shape * n_motions + motion, ``color_motion`` = color * n_motions + motion,
``color_size`` = color * n_sizes + size."""

SINGLE_LABEL_HEADS: tuple[str, ...] = ("background", "count")
"""Heads trained with softmax cross-entropy; the others are multi-label presence heads (sigmoid)."""

MULTI_LABEL_HEADS: tuple[str, ...] = tuple(h for h in HEADS if h not in SINGLE_LABEL_HEADS)
"""Presence heads: which values (or bound pairs of values) occur among the video's objects."""

MEAN_OF: tuple[str, ...] = ("shape", "color", "motion", "background")
"""Accuracies averaged into ``mean``."""

N_COLORS: int = _N["color"]
"""Number of palette colours = colour slots."""

ARCHITECTURE: str = "colour_slots"
"""Name of the architecture this module builds; saved in the config so older weights are refused clearly."""


@dataclass
class ClassifierConfig:
    """Architecture of :class:`AttributeClassifier` (saved next to the weights as JSON)."""

    width: int = 32
    """Channels of the first conv of the shape and background branches; later convs use 2x and 3x."""
    feature_dim: int = 640
    """Size of the penultimate features returned by ``features()``: ``feature_dim // 10`` values per colour
    slot (8) and for the background, the rest a global summary (see :attr:`AttributeClassifier.heads`)."""
    input_size: int = 128
    """The video is resized so its shorter side has this many pixels before the conv branches."""
    shape_frames: int = 4
    """Evenly spaced frames whose colour masks the shape branch sees."""
    background_frames: int = 2
    """Evenly spaced frames the background branch sees."""
    min_frames: int = 4
    """Fewest frames accepted."""
    min_side: int = 32
    """Smallest frame side (pixels) accepted."""
    architecture: str = ARCHITECTURE
    """Must equal :data:`ARCHITECTURE` (weights of other architectures cannot be loaded)."""

    @property
    def slot_dim(self) -> int:
        """Embedding size of each colour slot and of the background: ``feature_dim // 10``."""
        return self.feature_dim // (N_COLORS + 2)

    def __post_init__(self) -> None:
        for name in ("width", "feature_dim", "input_size", "shape_frames", "background_frames", "min_frames",
                     "min_side"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be a positive int, got {value!r}")
        if self.feature_dim < N_COLORS + 2:
            raise ValueError(f"ClassifierConfig.feature_dim must be >= {N_COLORS + 2}, got {self.feature_dim}")
        if self.architecture != ARCHITECTURE:
            raise ValueError(
                f"ClassifierConfig.architecture must be {ARCHITECTURE!r}, got {self.architecture!r} "
                "(weights of an older classifier.py; retrain it with training/classifier.py)"
            )


def _conv2d(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential:
    if norm == "batch":
        layer: nn.Module = nn.BatchNorm2d(cout)
    else:
        layer = nn.GroupNorm(8 if cout % 8 == 0 else 1, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), layer, nn.SiLU())


def _branch(cin: int, w: int, norm: str) -> nn.Sequential:
    """Six 3x3 convs, three of stride 2 (receptive field 55 px): enough for the largest object at 128 px.
    ``norm``: ``"batch"`` or ``"group"``."""
    return nn.Sequential(
        _conv2d(cin, w, 2, norm),
        _conv2d(w, 2 * w, 2, norm),
        _conv2d(2 * w, 2 * w, 1, norm),
        _conv2d(2 * w, 3 * w, 2, norm),
        _conv2d(3 * w, 3 * w, 1, norm),
        _conv2d(3 * w, 3 * w, 1, norm),
    )


PALETTE_SIGMA: float = 0.1
"""Width (RGB distance in [0, 1] units) of the soft colour masks; the closest palette colours are 0.36 apart."""

TRACK_POINTS: int = 8
"""Time points of each colour's track (mask centroid x, y and sqrt(area)); five motion summaries come with it
(presence, displacement x/y, path beyond the displacement, size change)."""

TRACK_FEATURES: int = 3 * TRACK_POINTS + 5
"""Track features per colour slot."""



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



def _logit_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """logit(sigmoid(a) * sigmoid(b)), computed stably (binds two presence logits of one slot)."""
    lp = F.logsigmoid(a) + F.logsigmoid(b)
    return lp - torch.log(-torch.expm1(lp.clamp_max(-1e-6)))


class _SlotHead(nn.Module):
    """A presence head on the features, from per-slot linear maps shared between heads (one per attribute, so
    "motion present" and "this colour moves so" come from the same per-slot logits).

    Modes: ``"max"``: the maximum over the colour slots (is the value present in any slot); ``"color_major"`` /
    ``"color_minor"``: all slot x value logits flattened, class = color * n_values + value / value * n_colors +
    color; ``"bound_max"`` (two linears a, b): logit(sigmoid(a) * sigmoid(b)) per slot, maximum over the slots,
    class = value_a * n_b + value_b."""

    def __init__(self, slot_dim: int, mode: str, *linears: nn.Linear):
        super().__init__()
        if mode not in ("max", "color_major", "color_minor", "bound_max"):
            raise ValueError(f"mode must be 'max', 'color_major', 'color_minor' or 'bound_max', got {mode!r}")
        if len(linears) != (2 if mode == "bound_max" else 1):
            raise ValueError(f"mode {mode!r} takes {2 if mode == 'bound_max' else 1} linear map(s), got {len(linears)}")
        self.slot_dim, self.mode = slot_dim, mode
        self.linears = nn.ModuleList(linears)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) from features (B, feature_dim)."""
        b = features.shape[0]
        slots = features[:, : N_COLORS * self.slot_dim].reshape(b, N_COLORS, self.slot_dim)
        out = self.linears[0](slots).float()  # (B, C, values)
        if self.mode == "max":
            return out.amax(dim=1)
        if self.mode == "bound_max":
            other = self.linears[1](slots).float()
            return _logit_of_product(out[..., :, None], other[..., None, :]).amax(dim=1).reshape(b, -1)
        if self.mode == "color_minor":
            out = out.transpose(1, 2)
        return out.reshape(b, -1)


class _SliceHead(nn.Module):
    """A linear head on the feature values ``[start:]`` (the background embedding and the global summary)."""

    def __init__(self, start: int, in_features: int, classes: int):
        super().__init__()
        self.start = start
        self.linear = nn.Linear(in_features, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) from features (B, feature_dim)."""
        return self.linear(features[:, self.start :]).float()


class AttributeClassifier(nn.Module):
    """Colour-slot attribute classifier of testbed videos; see the module docstring for the structure, the
    heads and the accuracy definition.

    ``features()`` returns ``[slot embeddings (N_COLORS x slot_dim) | background embedding (slot_dim) | global
    summary (the rest)]``; ``heads[name](features)`` gives each head's logits (``forward`` is exactly that).
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = cfg = config or ClassifierConfig()
        w, e = cfg.width, cfg.slot_dim
        rest = cfg.feature_dim - (N_COLORS + 1) * e
        palette = torch.tensor([COLOR_RGB[c] for c in ATTRIBUTES["color"]], dtype=torch.float32)
        self.register_buffer("palette", palette.view(1, -1, 3, 1, 1, 1), persistent=False)
        # Batch norm in the shape branch: statistics over all slots of the batch, so an absent colour's (all
        # but empty) mask stays near zero instead of being scaled up to unit variance as a per-sample norm would;
        # without any normalisation the branch did not learn at all (CPU probe: chance after 330 steps).
        self.shape_net = _branch(1, w, norm="batch")
        self.color_embed = nn.Parameter(torch.zeros(N_COLORS, e))
        # Half of each slot embedding sees shape code and track (shape, size), half the track only: motion then
        # trains as fast as an MLP on the tracks alone (CPU probe: 0.98 per-slot held-out motion accuracy), while
        # in one shared MLP it lagged far behind shape (motion 0.75-0.80 on real videos).
        self.slot_mlp = nn.Sequential(
            nn.Linear(3 * w + TRACK_FEATURES, 2 * e), nn.SiLU(), nn.Linear(2 * e, e // 2), nn.SiLU()
        )
        self.track_mlp = nn.Sequential(
            nn.Linear(TRACK_FEATURES, 2 * e), nn.SiLU(), nn.Linear(2 * e, e - e // 2), nn.SiLU()
        )
        self.background_net = _branch(4, w, norm="group")
        self.background_mlp = nn.Sequential(
            nn.Linear(6 * w + BACKGROUND_FEATURES, 2 * e), nn.SiLU(), nn.Linear(2 * e, e), nn.SiLU()
        )
        self.global_mlp = nn.Sequential(nn.Linear((N_COLORS + 1) * e, rest), nn.SiLU())
        # Per-slot logits of each object attribute, shared by the presence and pair heads.
        self.slot_linears = nn.ModuleDict({
            a: nn.Linear(e, 1 if a == "color" else _N[a]) for a in ("shape", "color", "motion", "size")
        })
        with torch.no_grad():
            for linear in self.slot_linears.values():
                # Start at the prior of a value being present in a slot (rare), not at p = 0.5.
                linear.bias.fill_(math.log(0.05 / 0.95))
        lin = self.slot_linears
        self.heads = nn.ModuleDict({
            "background": _SliceHead(N_COLORS * e, cfg.feature_dim - N_COLORS * e, _N["background"]),
            "count": _SliceHead(0, cfg.feature_dim, MAX_OBJECTS),
            "shape": _SlotHead(e, "max", lin["shape"]),
            "color": _SlotHead(e, "color_major", lin["color"]),
            "size": _SlotHead(e, "max", lin["size"]),
            "motion": _SlotHead(e, "max", lin["motion"]),
            "shape_color": _SlotHead(e, "color_minor", lin["shape"]),
            "shape_motion": _SlotHead(e, "bound_max", lin["shape"], lin["motion"]),
            "color_motion": _SlotHead(e, "color_major", lin["motion"]),
            "color_size": _SlotHead(e, "color_major", lin["size"]),
        })
        assert tuple(self.heads) == tuple(HEADS)

    def _prepare(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Resized video (B, 3, T, h, w) in [-1, 1], colour masks (B, C, T, h, w), tracks (B, C, TRACK_FEATURES)
        and background summaries (B, BACKGROUND_FEATURES), all float32."""
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
            radius = area.sqrt()
            track = torch.stack([cx, cy, 10.0 * radius], dim=2)  # (B, C, 3, T)
            # Motion summaries: displacement first->last quarter, path beyond the displacement (bounces),
            # relative change of size (pulsing).
            q = max(1, t // 4)
            dx = cx[..., -q:].mean(-1) - cx[..., :q].mean(-1)
            dy = cy[..., -q:].mean(-1) - cy[..., :q].mean(-1)
            path = ((cx[..., 1:] - cx[..., :-1]).abs() + (cy[..., 1:] - cy[..., :-1]).abs()).sum(-1)
            pulse = radius.std(dim=-1) / (radius.mean(dim=-1) + 1e-3) * present.mean(-1)
            motion = torch.stack(
                [present.mean(-1), 3.0 * dx, 3.0 * dy, 3.0 * (path - dx.abs() - dy.abs()), 5.0 * pulse], dim=-1
            )
            points = F.adaptive_avg_pool1d(track.reshape(b * N_COLORS, 3, t), TRACK_POINTS)
            tracks = torch.cat([points.reshape(b, N_COLORS, 3 * TRACK_POINTS), motion], dim=2)
            background = _background_features(rgb01[:, 0], masks)
        return video, masks, tracks, background

    @staticmethod
    def _frames(t: int, n: int, device: torch.device) -> torch.Tensor:
        return torch.linspace(0, t - 1, min(n, t), device=device).round().long()

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim), float32, of videos (B, 3, T, H, W) in [-1, 1] (layout in the
        class docstring)."""
        video, masks, tracks, bg_summary = self._prepare(video)
        b, c, t, h, w = masks.shape
        dtype = self.shape_net[0][0].weight.dtype
        # Shape codes: each colour's mask at a few frames through the shared conv net, max over space.
        idx = self._frames(t, self.config.shape_frames, masks.device)
        m = masks[:, :, idx].reshape(b * c * len(idx), 1, h, w)
        shape_code = self.shape_net(m.to(dtype)).amax(dim=(2, 3)).float()  # (B*C*F, 3w)
        shape_code = shape_code.view(b, c, len(idx), -1).mean(dim=2)
        slots = torch.cat([self.slot_mlp(torch.cat([shape_code, tracks], dim=2)), self.track_mlp(tracks)], dim=2)
        slots = (slots + self.color_embed).float()  # (B, C, e)
        # Background: RGB + "object here" mask of a few frames, mean-pooled where no object is, and max-pooled.
        jdx = self._frames(t, self.config.background_frames, masks.device)
        obj = masks[:, :, jdx].amax(dim=1, keepdim=True).permute(0, 2, 1, 3, 4).reshape(b * len(jdx), 1, h, w)
        frames = video[:, :, jdx].permute(0, 2, 1, 3, 4).reshape(b * len(jdx), 3, h, w)
        x = self.background_net(torch.cat([frames, 2.0 * obj - 1.0], dim=1).to(dtype)).float()
        free = 1.0 - F.adaptive_max_pool2d(obj, x.shape[-2:])
        pooled = torch.cat([(x * free).sum(dim=(2, 3)) / (free.sum(dim=(2, 3)) + 1e-3), x.amax(dim=(2, 3))], dim=1)
        bg = self.background_mlp(torch.cat([pooled.view(b, len(jdx), -1).mean(dim=1), bg_summary], dim=1)).float()
        both = torch.cat([slots.flatten(1), bg], dim=1)
        return torch.cat([both, self.global_mlp(both).float()], dim=1)

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head (see :data:`HEADS`), each (B, classes), float32: ``heads[name](features(video))``."""
        feats = self.features(video)
        return {name: head(feats) for name, head in self.heads.items()}


# ---------------------------------------------------------------------------------------------- targets


def head_targets(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets of every head from video labels (layout of ``VideoBatch.labels``).

    Single-label heads: LongTensor (B,) class indices (``count`` is 0-based). Multi-label heads: float
    multi-hot (B, classes)."""
    present = labels["shape"] >= 0  # (B, N)
    shape, color, size, motion = (labels[a].clamp_min(0) for a in ("shape", "color", "size", "motion"))
    values = {
        "shape": shape,
        "color": color,
        "size": size,
        "motion": motion,
        "shape_color": shape * _N["color"] + color,
        "shape_motion": shape * _N["motion"] + motion,
        "color_motion": color * _N["motion"] + motion,
        "color_size": color * _N["size"] + size,
    }
    out: dict[str, torch.Tensor] = {
        "background": labels["background"].long(),
        "count": (labels["count"] - 1).long(),
    }
    for name, v in values.items():
        hot = torch.zeros(v.shape[0], HEADS[name], device=v.device)
        # Added (absent slots add 0), then capped: two objects may share a value.
        hot.scatter_add_(1, v.long(), present.float())
        out[name] = hot.clamp_max(1.0)
    return out


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
        # clone(): heads share their per-slot linear maps, and safetensors refuses tensors sharing memory.
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
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
    if fields.get("architecture") != ARCHITECTURE:
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a classifier of architecture {fields.get('architecture', 'trunk (before colour slots)')!r}; "
            f"this classifier.py builds {ARCHITECTURE!r}: retrain it (training/classifier.py) and save it with save_classifier"
        )
    config = ClassifierConfig(**fields)
    model = AttributeClassifier(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS_NAME)).items()}
    model.load_state_dict(state)
    return model.to(device).eval()
