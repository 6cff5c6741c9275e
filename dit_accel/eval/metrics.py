"""Reference metrics (accelerated vs dense output of the same seed) and distribution metrics (FID/KID).

Videos are float tensors ``(T, 3, H, W)`` in ``[0, 1]`` (one video) unless stated otherwise.

Reference metrics, per video, then averaged over the prompt set:

- ``psnr``: ``10 log10(1 / MSE)`` with MSE over all pixels, channels and frames of the video
  (torchmetrics ``peak_signal_noise_ratio``, ``data_range=1``); capped at :data:`PSNR_CAP` dB so identical
  videos give a finite number (JSON has no infinity).
- ``ssim``: torchmetrics ``structural_similarity_index_measure`` (Gaussian window sigma 1.5, size 11, or the
  largest odd size that fits frames smaller than 11 px), per frame, averaged over frames.
- ``feature_distance``: ``1 - cos(f(a), f(b))`` of the feature network's video features (the testbed
  classifier by default): 0 for identical videos, larger when content differs in ways the network sees.
- ``lpips``: torchmetrics LPIPS (``alex``/``vgg``/``squeeze``) per frame, averaged over frames; only with the
  backbone weights on disk (:class:`LPIPSScorer`).

Distribution metrics, over sets of videos (``fid``/``kid`` from features; see :mod:`.features`):

- ``fid``: torchmetrics ``FrechetInceptionDistance`` on precomputed features:
  ``|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})`` (unbiased covariances). With fewer videos than
  feature dimensions the covariances are singular and FID is biased upwards: compare configurations only at
  the same prompt count.
- ``kid``: torchmetrics ``KernelInceptionDistance`` (cubic polynomial kernel, unbiased MMD^2) over random
  subsets of ``min(n, 1000)`` videos, with a fixed seed so the number is reproducible.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .features import PrecomputedFeatures

__all__ = [
    "PSNR_CAP",
    "psnr",
    "ssim",
    "feature_distance",
    "LPIPSScorer",
    "fid_from_features",
    "kid_from_features",
    "to_video_tensor",
]

PSNR_CAP: float = 100.0
"""PSNR reported for (near-)identical videos, in dB (an MSE below 1e-10)."""


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"expected a video (T, 3, H, W) in [0, 1], got shape {tuple(a.shape)}")


def to_video_tensor(frames: object) -> torch.Tensor:
    """A video as float32 ``(T, 3, H, W)`` from a numpy/torch array ``(T, H, W, 3)`` or ``(T, 3, H, W)`` in [0, 1]."""
    t = torch.as_tensor(frames).detach().float().cpu()
    if t.ndim == 3:  # a single image
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected frames (T, H, W, 3) or (T, 3, H, W), got shape {tuple(t.shape)}")
    if t.shape[-1] == 3 and t.shape[1] != 3:
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(t.shape)}")
    return t.contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of video ``a`` against ``b`` (see the module docstring), capped at :data:`PSNR_CAP`."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check_pair(a, b)
    mse = F.mse_loss(a.double(), b.double()).item()
    if mse < 1e-10:
        return PSNR_CAP
    value = float(peak_signal_noise_ratio(a.double(), b.double(), data_range=1.0))
    return min(value, PSNR_CAP)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over frames of the SSIM of ``a``'s frames against ``b``'s (see the module docstring)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    side = min(a.shape[-2:])
    kernel = 11 if side >= 11 else max(3, side - (1 - side % 2))
    value = structural_similarity_index_measure(
        a.double(), b.double(), data_range=1.0, kernel_size=kernel, sigma=1.5 * kernel / 11, reduction="elementwise_mean"
    )
    return float(value)


def feature_distance(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` of matching rows of features ``(N, d)``: ``(N,)``; 0 for identical features."""
    if fa.shape != fb.shape or fa.ndim != 2:
        raise ValueError(f"expected two feature matrices (N, d) of one shape, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    return 1.0 - F.cosine_similarity(fa.double(), fb.double(), dim=1, eps=1e-12).float()


class LPIPSScorer:
    """LPIPS through torchmetrics, with the backbone weights read from disk (never downloaded).

    ``net``: ``"alex"``, ``"vgg"`` or ``"squeeze"``. ``torch_home``: a folder whose ``hub/checkpoints/`` holds the
    torchvision backbone file (e.g. ``alexnet-owt-7be5be79.pth``); default: ``$TORCH_HOME`` or
    ``~/.cache/torch``. The LPIPS linear heads ship inside torchmetrics. Needs torchvision; raises
    ``ImportError``/``FileNotFoundError`` with what is missing.
    """

    BACKBONE_FILES = {
        "alex": "alexnet-owt-7be5be79.pth",
        "vgg": "vgg16-397923af.pth",
        "squeeze": "squeezenet1_1-b8a52dc0.pth",
    }
    """torchvision weight files the backbones load from ``<torch_home>/hub/checkpoints``."""

    def __init__(self, net: str = "alex", torch_home: str | Path | None = None) -> None:
        if net not in self.BACKBONE_FILES:
            raise ValueError(f"unknown LPIPS net {net!r}; allowed: {sorted(self.BACKBONE_FILES)}")
        home = Path(torch_home or os.environ.get("TORCH_HOME") or Path.home() / ".cache" / "torch")
        weights = home / "hub" / "checkpoints" / self.BACKBONE_FILES[net]
        if not weights.is_file():
            raise FileNotFoundError(
                f"LPIPS-{net} needs the torchvision backbone weights at {weights}; copy the file there "
                "(this tool never downloads weights)"
            )
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("LPIPS needs torchvision (torchmetrics' LPIPS backbones)") from err
        os.environ["TORCH_HOME"] = str(home)
        self.net = net
        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean over frames of LPIPS between ``a``'s and ``b``'s frames."""
        _check_pair(a, b)
        self.metric.reset()
        with torch.no_grad():
            self.metric.update(a.clamp(0, 1), b.clamp(0, 1))
        return float(self.metric.compute())


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float | None:
    """Fréchet distance between two feature sets ``(N, d)`` via torchmetrics (``None`` if a set has < 2 rows)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected feature sets (N, d) with one d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        return None
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    value = float(metric.compute())
    # A tiny negative number can come out of the matrix square root for equal sets.
    return max(value, 0.0) if math.isfinite(value) else value


def kid_from_features(
    real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """KID (mean, std over subsets) of two feature sets via torchmetrics; ``None`` if a set has < 2 rows.

    ``subset_size`` is lowered to the smaller set size; subsets are drawn with ``seed``.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected feature sets (N, d) with one d, got {tuple(real.shape)} and {tuple(fake.shape)}")
    n = min(real.shape[0], fake.shape[0])
    if n < 2:
        return None
    metric = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=min(subset_size, n))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
