"""Feature networks for FID/KID, perceptual distances and the VBench-style consistency scores.

A feature extractor is an ``nn.Module`` that maps videos ``(N, T, 3, H, W)`` in ``[0, 1]`` to features
``(N, d)`` and has an int attribute ``num_features`` (= ``d``); :meth:`VideoFeatures.frame_features`
maps single frames ``(M, 3, H, W)`` to ``(M, d)``. Two are provided:

- :class:`TestbedClassifierFeatures` (default, offline): the penultimate features of the testbed's
  attribute classifier (:mod:`dit_accel.testbed.classifier`), loaded from the shipped
  ``dit_accel/testbed/weights/classifier/``. A video is one clip (the classifier pools adaptively over
  time); a single frame is fed as a static clip of ``min_frames`` copies.
- :class:`InceptionFeatures`: the standard FID InceptionV3 (pool3, 2048-d) per frame, averaged over the
  video's frames. Needs ``torch-fidelity`` and its weights file on disk
  (``weights-inception-2015-12-05-6726825d.pth``); nothing is downloaded. Not usable on the CPU
  machines of this project (torchvision/torch-fidelity cannot be installed next to CPU torch).

Any other module following the same contract plugs into :func:`dit_accel.eval.harness.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["VideoFeatures", "TestbedClassifierFeatures", "InceptionFeatures", "load_testbed_features", "PrecomputedFeatures"]


class VideoFeatures(nn.Module):
    """Base class of video feature extractors (see the module docstring for the contract)."""

    num_features: int
    """Feature size ``d`` (read by torchmetrics' FID/KID)."""

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """Features ``(N, d)`` of videos ``(N, T, 3, H, W)`` in ``[0, 1]``."""
        raise NotImplementedError

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Features ``(M, d)`` of single frames ``(M, 3, H, W)`` in ``[0, 1]``."""
        raise NotImplementedError


def _check_videos(videos: torch.Tensor) -> None:
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"expected videos (N, T, 3, H, W) in [0, 1], got shape {tuple(videos.shape)}")


class TestbedClassifierFeatures(VideoFeatures):
    """Penultimate features of the testbed attribute classifier (256-d by default).

    ``classifier``: an :class:`dit_accel.testbed.classifier.AttributeClassifier` (trained weights for
    meaningful numbers; a randomly initialised one still gives a fixed, deterministic feature map for tests).
    ``batch_size`` bounds memory (clips per forward).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, classifier: nn.Module, batch_size: int = 16) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.config.feature_dim)
        self.min_frames = int(classifier.config.min_frames)
        self.batch_size = int(batch_size)

    def _clips(self, clips: torch.Tensor) -> torch.Tensor:
        # clips: (N, 3, T, H, W) in [0, 1] -> classifier input range [-1, 1]
        device = next(self.classifier.parameters()).device
        out = []
        with torch.no_grad():
            for i in range(0, clips.shape[0], self.batch_size):
                chunk = clips[i : i + self.batch_size].to(device=device, dtype=torch.float32)
                out.append(self.classifier.features(chunk * 2.0 - 1.0).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.num_features)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """Features of whole videos (one clip each); needs at least ``min_frames`` frames."""
        _check_videos(videos)
        if videos.shape[1] < self.min_frames:
            # Repeat the last frame: too-short videos (e.g. images) still get a feature.
            pad = videos[:, -1:].expand(-1, self.min_frames - videos.shape[1], -1, -1, -1)
            videos = torch.cat([videos, pad], dim=1)
        return self._clips(videos.permute(0, 2, 1, 3, 4))

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Features of single frames, each fed as a static clip of ``min_frames`` copies."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"expected frames (M, 3, H, W) in [0, 1], got shape {tuple(frames.shape)}")
        clips = frames[:, :, None].expand(-1, -1, self.min_frames, -1, -1)
        return self._clips(clips)


def load_testbed_features(folder: str | Path | None = None, device: str | torch.device = "cpu") -> TestbedClassifierFeatures:
    """The testbed feature network from ``folder`` (default: the shipped ``testbed/weights/classifier``).

    Raises ``FileNotFoundError`` naming the missing file when the weights are not there.
    """
    from dit_accel.testbed import WEIGHTS_DIR
    from dit_accel.testbed.classifier import load_classifier

    path = Path(folder) if folder is not None else WEIGHTS_DIR / "classifier"
    return TestbedClassifierFeatures(load_classifier(path, device=device))


class InceptionFeatures(VideoFeatures):
    """FID InceptionV3 pool3 features (2048-d) per frame, averaged over each video's frames.

    ``weights_path``: the torch-fidelity weights file ``weights-inception-2015-12-05-6726825d.pth`` on disk.
    Raises ``ImportError`` when ``torch-fidelity`` is missing and ``FileNotFoundError`` when the file is.
    """

    def __init__(self, weights_path: str | Path, batch_size: int = 32) -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path} (expected weights-inception-2015-12-05-6726825d.pth)")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("InceptionFeatures needs torch-fidelity (pip install torch-fidelity)") from err
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
        self.num_features = 2048
        self.batch_size = int(batch_size)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """Pool3 features of frames ``(M, 3, H, W)`` in ``[0, 1]`` (resized to 299 by the network)."""
        out = []
        with torch.no_grad():
            for i in range(0, frames.shape[0], self.batch_size):
                chunk = (frames[i : i + self.batch_size].clamp(0, 1) * 255).to(torch.uint8)
                out.append(self.net(chunk).float().cpu())
        return torch.cat(out)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """Mean over frames of the per-frame features."""
        _check_videos(videos)
        n, t = videos.shape[:2]
        return self.frame_features(videos.flatten(0, 1)).view(n, t, -1).mean(dim=1)


class PrecomputedFeatures(nn.Module):
    """Identity feature module for torchmetrics FID/KID when features are computed once beforehand.

    The harness extracts every video's features a single time and feeds them to several metrics; this
    module lets torchmetrics do the Fréchet / kernel computation on them.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return ``features`` (N, num_features) unchanged after a shape check."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}), got shape {tuple(features.shape)}")
        return features
