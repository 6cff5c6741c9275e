"""VBench-style video dimensions computed from the frames alone (no downloaded models).

A video is a float tensor ``(T, 3, H, W)`` in ``[0, 1]``. Every score is a float (higher is better except
``dynamic_degree``, which measures how much moves), or ``None`` when the video is too short for it.

Foreground estimate (:func:`foreground_masks`): a pixel is *foreground* in frame ``t`` when it differs from
the video's temporal median frame by more than ``threshold`` in some channel (content that moves or
changes), dilated by ``dilate`` pixels. Everything else is *static background*. Simple and model-free: it
suits the testbed (objects move over slowly panning backgrounds) and static-camera videos; with strong
camera motion everything becomes foreground.

Formulas (``x_t`` frame ``t``, ``m_t`` its foreground mask, ``f`` the feature network's frame features,
``c(u, v)`` cosine similarity, means over valid ``t``):

- ``subject_consistency = mean_{t>=1} [c(f(s_t), f(s_0)) + c(f(s_t), f(s_{t-1}))] / 2`` with
  ``s_t = m_t * x_t + (1 - m_t) * 0.5`` (the moving subject on grey). VBench: DINO ViT-B/16 features of the
  whole frames; ours masks the frame to the foreground estimate and uses the testbed feature network.
- ``background_consistency``: the same formula on ``b_t = (1 - m_t) * x_t + m_t * median`` (the subject
  replaced by the temporal median). VBench: CLIP ViT-B/32 features of the whole frames.
- ``temporal_flickering = 1 - mean |x_{t+1} - x_t|`` over the pixels static in both frames. VBench: the same
  mean absolute difference (0-255 scale, score ``(255 - MAE) / 255``) over whole frames of videos it
  judged static; ours restricts to static pixels so moving videos can be scored too.
- ``motion_smoothness = 1 - mean_{1<=t<=T-2} |x_t - (x_{t-1} + x_{t+1}) / 2|``: the error of linear
  interpolation of each inner frame from its neighbours. VBench: AMT-S frame interpolation of the
  dropped odd frames, score ``(255 - MAE) / 255``; ours uses the linear midpoint (motion that is smooth but
  not linear in intensity costs a little).
- ``dynamic_degree``: per consecutive pair, the optical flow magnitude in units of the shorter frame side;
  the mean of its top 5 %, averaged over pairs. Flow: OpenCV Farneback when ``cv2`` imports (``flow="auto"``
  or ``"farneback"``), else block matching (``"block"``: 8x8 blocks, exhaustive integer search within
  +-``radius`` px minimising the mean absolute difference). VBench: RAFT flow, the top-5 % mean thresholded
  into a binary "dynamic" per video and reported as the share of dynamic videos; ours keeps the continuous
  value (report which backend ran: the two differ slightly).
- ``prompt_adherence``: on the testbed, the attribute classifier's accuracy on the prompted attributes
  (:func:`dit_accel.testbed.classifier.attribute_accuracy`, ``mean`` of shape/color/motion/background);
  elsewhere a user scorer ``(video, prompt) -> float`` (e.g. CLIPScore on the frames). VBench: GRiT /
  Tag2Text / ViCLIP per dimension.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "FLOW_BACKENDS",
    "foreground_masks",
    "consistency",
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "block_matching_flow",
    "optical_flow",
    "dynamic_degree",
    "flow_backend",
    "PromptScorer",
]

FLOW_BACKENDS: tuple[str, ...] = ("auto", "farneback", "block")
"""Optical-flow choices: ``auto`` = Farneback if OpenCV imports, else block matching."""

PromptScorer = Callable[[torch.Tensor, str], float]
"""A prompt-adherence scorer: ``(video (T, 3, H, W) in [0, 1], prompt) -> score`` (higher is better)."""


def _check_video(video: torch.Tensor) -> None:
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"expected a video tensor (T, 3, H, W) in [0, 1], got {shape}")


def foreground_masks(video: torch.Tensor, threshold: float = 0.08, dilate: int = 1) -> torch.Tensor:
    """Foreground masks ``(T, 1, H, W)`` bool: pixels off the temporal median by > ``threshold`` (dilated)."""
    _check_video(video)
    median = video.median(dim=0).values
    mask = ((video - median).abs().amax(dim=1, keepdim=True) > threshold).float()
    if dilate > 0:
        mask = F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate)
    return mask > 0.5


def consistency(features: torch.Tensor) -> float | None:
    """VBench's consistency of per-frame features ``(T, d)``: mean of (cos to frame 0 + cos to previous) / 2."""
    if features.ndim != 2:
        raise ValueError(f"expected per-frame features (T, d), got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        return None
    f = F.normalize(features.double(), dim=1, eps=1e-12)
    to_first = (f[1:] * f[:1]).sum(dim=1)
    to_prev = (f[1:] * f[:-1]).sum(dim=1)
    return float(((to_first + to_prev) / 2).mean())


FrameFeatures = Callable[[torch.Tensor], torch.Tensor]
"""Frames ``(M, 3, H, W)`` in [0, 1] -> features ``(M, d)`` (e.g. ``VideoFeatures.frame_features``)."""


def subject_consistency(video: torch.Tensor, frame_features: FrameFeatures, masks: torch.Tensor | None = None) -> float | None:
    """Consistency of the foreground-on-grey frames' features (see the module docstring)."""
    _check_video(video)
    masks = foreground_masks(video) if masks is None else masks
    subject = torch.where(masks, video, torch.full_like(video, 0.5))
    return consistency(frame_features(subject))


def background_consistency(video: torch.Tensor, frame_features: FrameFeatures, masks: torch.Tensor | None = None) -> float | None:
    """Consistency of the frames with the foreground replaced by the temporal median (module docstring)."""
    _check_video(video)
    masks = foreground_masks(video) if masks is None else masks
    median = video.median(dim=0).values.expand_as(video)
    background = torch.where(masks, median, video)
    return consistency(frame_features(background))


def temporal_flickering(video: torch.Tensor, masks: torch.Tensor | None = None) -> float | None:
    """``1 - mean |x_{t+1} - x_t|`` over pixels static in both frames (all pixels if none is static)."""
    _check_video(video)
    if video.shape[0] < 2:
        return None
    masks = foreground_masks(video) if masks is None else masks
    diff = (video[1:] - video[:-1]).abs().double()  # (T-1, 3, H, W)
    static = ~(masks[1:] | masks[:-1])  # (T-1, 1, H, W)
    weight = static.expand_as(diff).double()
    if weight.sum() == 0:
        return float(1.0 - diff.mean())
    return float(1.0 - (diff * weight).sum() / weight.sum())


def motion_smoothness(video: torch.Tensor) -> float | None:
    """``1 - mean |x_t - (x_{t-1} + x_{t+1}) / 2|`` over inner frames (``None`` for fewer than 3 frames)."""
    _check_video(video)
    if video.shape[0] < 3:
        return None
    v = video.double()
    return float(1.0 - (v[1:-1] - (v[:-2] + v[2:]) / 2).abs().mean())


def _gray(frame: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=frame.dtype, device=frame.device).view(3, 1, 1)
    return (frame * weights).sum(dim=0)


def block_matching_flow(prev: torch.Tensor, nxt: torch.Tensor, block: int = 8, radius: int = 4) -> torch.Tensor:
    """Coarse optical flow ``(H // block, W // block, 2)`` (dx, dy in pixels) between two frames ``(3, H, W)``.

    For every ``block x block`` block of ``prev``, the integer shift within ``+-radius`` px whose shifted
    ``nxt`` block has the smallest mean absolute difference (grey levels); ties keep the smaller shift.
    """
    a, b = _gray(prev.float()), _gray(nxt.float())
    h, w = a.shape
    hb, wb = h // block, w // block
    if hb == 0 or wb == 0:
        raise ValueError(f"frames of {h}x{w} px are smaller than one {block}x{block} block")
    padded = F.pad(b[None, None], (radius, radius, radius, radius), mode="replicate")[0, 0]
    # Candidates ordered by shift magnitude, so argmin (first minimum) keeps the smallest motion on ties.
    shifts = sorted(((dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)),
                    key=lambda s: (s[0] ** 2 + s[1] ** 2, s))
    windows = padded.unfold(0, h, 1).unfold(1, w, 1)  # (2r+1, 2r+1, h, w): window [dy+r, dx+r]
    moved = torch.stack([windows[radius + dy, radius + dx] for dx, dy in shifts])  # (S, h, w)
    diff = (moved - a)[:, None, : hb * block, : wb * block].abs()
    cost = F.avg_pool2d(diff, block)[:, 0]  # (S, hb, wb)
    best = cost.argmin(dim=0)
    table = torch.tensor(shifts, dtype=torch.float32)  # (S, 2) as (dx, dy)
    return table[best]


def _cv2():
    try:
        import cv2  # optional: OpenCV is not a dependency of dit-accel
    except ImportError:
        return None
    return cv2


def flow_backend(flow: str = "auto") -> str:
    """The backend ``flow`` resolves to here: ``"farneback"`` or ``"block"`` (raises on unknown names)."""
    if flow not in FLOW_BACKENDS:
        raise ValueError(f"unknown optical-flow backend {flow!r}; allowed: {FLOW_BACKENDS}")
    if flow == "auto":
        return "farneback" if _cv2() is not None else "block"
    if flow == "farneback" and _cv2() is None:
        raise ImportError("flow='farneback' needs OpenCV (pip install opencv-python-headless); or use flow='block'")
    return flow


def optical_flow(prev: torch.Tensor, nxt: torch.Tensor, flow: str = "auto") -> torch.Tensor:
    """Flow ``(h, w, 2)`` in pixels from ``prev`` to ``nxt`` (frames ``(3, H, W)``) with the chosen backend."""
    backend = flow_backend(flow)
    if backend == "block":
        return block_matching_flow(prev, nxt)
    cv2 = _cv2()
    a = (_gray(prev.float()).clamp(0, 1) * 255).to(torch.uint8).numpy()
    b = (_gray(nxt.float()).clamp(0, 1) * 255).to(torch.uint8).numpy()
    out = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    return torch.from_numpy(out).float()


def dynamic_degree(video: torch.Tensor, flow: str = "auto", top_fraction: float = 0.05) -> float | None:
    """Mean over frame pairs of the top-``top_fraction`` mean flow magnitude, in shorter-side units."""
    _check_video(video)
    if video.shape[0] < 2:
        return None
    side = float(min(video.shape[-2:]))
    values = []
    for t in range(video.shape[0] - 1):
        mag = optical_flow(video[t], video[t + 1], flow).norm(dim=-1).flatten()
        k = max(1, int(round(top_fraction * mag.numel())))
        values.append(mag.topk(k).values.mean().item() / side)
    return float(sum(values) / len(values))
