"""Metrics of dit_accel.eval with known answers: reference metrics, FID/KID, VBench-style dimensions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dit_accel.eval import metrics, video
from dit_accel.eval.features import PrecomputedFeatures, TestbedClassifierFeatures


def _video(t: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(t, 3, h, w, generator=g)


# ------------------------------------------------------------------------------------------ reference


def test_identical_videos() -> None:
    a = _video()
    assert metrics.psnr(a, a.clone()) == metrics.PSNR_CAP
    assert metrics.ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-9)
    f = torch.randn(3, 16)
    assert torch.allclose(metrics.feature_distance(f, f.clone()), torch.zeros(3), atol=1e-6)


def test_psnr_of_noise_with_known_variance() -> None:
    a = _video(t=4, h=32, w=32)
    sigma = 0.05
    signs = torch.randint(0, 2, a.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    b = a + sigma * signs  # every pixel off by exactly sigma: MSE = sigma^2, no clipping ([0.15, 0.85])
    assert metrics.psnr(b, a) == pytest.approx(-10 * math.log10(sigma**2), abs=1e-5)  # 26.0206 dB
    gauss = a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))
    assert metrics.psnr(gauss, a) == pytest.approx(-10 * math.log10(0.02**2), abs=0.1)  # 33.98 dB


def test_psnr_of_shifted_frames() -> None:
    # Frame t of b is frame t+1 of a: the MSE is the mean squared frame-to-frame change.
    a = _video(t=5)
    b = torch.cat([a[1:], a[-1:]])
    mse = ((a - b) ** 2).double().mean().item()
    assert metrics.psnr(b, a) == pytest.approx(10 * math.log10(1 / mse), abs=1e-6)


def test_ssim_of_constant_frames_is_the_luminance_term() -> None:
    a = torch.full((2, 3, 24, 24), 0.4)
    b = torch.full((2, 3, 24, 24), 0.6)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1)  # zero variance: contrast/structure terms are 1
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-6)
    noisy = _video(t=2, h=24, w=24)
    assert metrics.ssim(noisy, a) < 0.5


def test_feature_distance_known_angles() -> None:
    fa = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    fb = torch.tensor([[0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]])
    assert metrics.feature_distance(fa, fb).tolist() == pytest.approx([1.0, 2.0, 0.0], abs=1e-6)


def test_reference_metric_errors() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(_video(t=3), _video(t=4))
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        metrics.ssim(torch.zeros(3, 4, 8, 8), torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match="unknown LPIPS net 'resnet'"):
        metrics.LPIPSScorer("resnet")
    with pytest.raises(FileNotFoundError, match="alexnet-owt-7be5be79.pth"):
        metrics.LPIPSScorer("alex", torch_home="/nonexistent/torch_home")


def test_to_video_tensor_layouts() -> None:
    thwc = np.random.default_rng(0).random((4, 8, 10, 3), dtype=np.float32)
    v = metrics.to_video_tensor(thwc)
    assert v.shape == (4, 3, 8, 10)
    assert torch.equal(metrics.to_video_tensor(v), v)
    assert metrics.to_video_tensor(thwc[0]).shape == (1, 3, 8, 10)


# ---------------------------------------------------------------------------------------- FID / KID


def _whitened(n: int, d: int, seed: int) -> torch.Tensor:
    """Samples with exactly zero mean and identity (unbiased) covariance."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(dim=0)
    cov = x.T @ x / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    return x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def test_fid_of_two_gaussians_matches_the_closed_form() -> None:
    d, n = 4, 64
    x = _whitened(n, d, 0)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    scale = 2.0
    y = _whitened(n, d, 1) * scale + shift
    # N(0, I) vs N(shift, scale^2 I): |shift|^2 + Tr(I + s^2 I - 2 s I) = |shift|^2 + d (1 - s)^2
    expected = float(shift.square().sum()) + d * (1 - scale) ** 2
    assert metrics.fid_from_features(x, y) == pytest.approx(expected, rel=1e-4)
    assert metrics.fid_from_features(x, x.clone()) == pytest.approx(0.0, abs=1e-4)


def test_fid_with_general_covariances() -> None:
    g = torch.Generator().manual_seed(3)
    d, n = 3, 20000
    a1, a2 = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    mu1, mu2 = torch.randn(d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g) @ a1.T + mu1
    y = torch.randn(n, d, generator=g) @ a2.T + mu2
    s1, s2 = (a1 @ a1.T).double().numpy(), (a2 @ a2.T).double().numpy()
    # Tr sqrt(S1 S2) = sum of the square roots of the eigenvalues of S1 S2 (real and >= 0: S1 S2 is
    # similar to S1^1/2 S2 S1^1/2), so no scipy is needed.
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0.0, None)).sum())
    closed = float((mu1 - mu2).square().sum()) + float(np.trace(s1 + s2)) - 2.0 * tr_sqrt
    assert metrics.fid_from_features(x, y) == pytest.approx(closed, rel=0.05)


def test_fid_needs_two_samples_and_one_dimension() -> None:
    assert metrics.fid_from_features(torch.zeros(1, 4), torch.zeros(5, 4)) is None
    with pytest.raises(ValueError, match="one d"):
        metrics.fid_from_features(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        PrecomputedFeatures(4)(torch.zeros(2, 3))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    same, _ = metrics.kid_from_features(x, y, subsets=20, subset_size=100)
    small, _ = metrics.kid_from_features(x, y + 0.5, subsets=20, subset_size=100)
    large, _ = metrics.kid_from_features(x, y + 1.5, subsets=20, subset_size=100)
    # unbiased MMD^2: about 0 (within its subset noise) for one distribution, positive and growing with the shift
    assert abs(same) < 0.1 < small < large
    assert small > 10 * abs(same)
    # reproducible: fixed subset seed
    assert metrics.kid_from_features(x, y + 0.5, subsets=20, subset_size=100) == metrics.kid_from_features(
        x, y + 0.5, subsets=20, subset_size=100
    )


# ---------------------------------------------------------------------------------------- video dims


def _moving_square(t: int = 6, side: int = 32, step: int = 2) -> torch.Tensor:
    v = torch.full((t, 3, side, side), 0.3)
    for i in range(t):
        v[i, :, 10:16, 4 + step * i : 10 + step * i] = 0.9
    return v


def test_foreground_masks_find_the_moving_object() -> None:
    v = _moving_square()
    m = video.foreground_masks(v, dilate=0)
    assert m.shape == (6, 1, 32, 32)
    assert m[0, 0, 12, 5] and m[5, 0, 12, 18]
    assert not m[:, 0, 25:, :].any() and not m[:, 0, :5, :].any()


def test_consistency_formula() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    # t=1: (cos(f1, f0) + cos(f1, f0)) / 2 = 0; t=2: (cos(f2, f0) + cos(f2, f1)) / 2 = 0.5
    assert video.consistency(f) == pytest.approx(0.25)
    assert video.consistency(f[:1]) is None


def _pooled(frames: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.avg_pool2d(frames, 4).flatten(1)


def test_subject_and_background_consistency() -> None:
    static = _video(t=4)[:1].expand(4, -1, -1, -1).clone()
    assert video.subject_consistency(static, _pooled) == pytest.approx(1.0, abs=1e-6)
    assert video.background_consistency(static, _pooled) == pytest.approx(1.0, abs=1e-6)
    # A moving square on a fixed background: the background (square removed) stays the same,
    # the subject (square on grey) changes position.
    v = _moving_square(t=6, step=4)
    assert video.background_consistency(v, _pooled) == pytest.approx(1.0, abs=1e-6)
    assert video.subject_consistency(v, _pooled) < 0.99


def test_temporal_flickering_known_answers() -> None:
    static = _video(t=4)[:1].expand(4, -1, -1, -1).clone()
    assert video.temporal_flickering(static) == pytest.approx(1.0)
    flicker = static + 0.03 * torch.tensor([0.0, 1.0, 0.0, 1.0]).view(4, 1, 1, 1)  # below the mask threshold
    assert video.temporal_flickering(flicker) == pytest.approx(1 - 0.03, abs=1e-6)
    # The moving object itself is excluded: a moving square over a static background does not flicker.
    assert video.temporal_flickering(_moving_square()) == pytest.approx(1.0)


def test_motion_smoothness_known_answers() -> None:
    ramp = torch.linspace(0, 0.6, 5).view(5, 1, 1, 1).expand(5, 3, 8, 8) + 0.2  # linear in time
    assert video.motion_smoothness(ramp) == pytest.approx(1.0, abs=1e-6)
    jitter = ramp.clone()
    jitter[2] += 0.1  # frame 2 off its neighbours' midpoint by 0.1; frames 1 and 3 by 0.05
    assert video.motion_smoothness(jitter) == pytest.approx(1 - (0.05 + 0.1 + 0.05) / 3, abs=1e-6)
    assert video.motion_smoothness(ramp[:2]) is None


def _textured_shifts(dx: int, dy: int, t: int = 3, side: int = 48) -> torch.Tensor:
    big = torch.rand(3, side + 40, side + 40, generator=torch.Generator().manual_seed(5))
    frames = [big[:, 20 - i * dy : 20 - i * dy + side, 20 - i * dx : 20 - i * dx + side] for i in range(t)]
    return torch.stack(frames)  # content moves by (+dx, +dy) px per frame


def test_block_matching_flow_recovers_a_shift() -> None:
    v = _textured_shifts(2, 1)
    flow = video.block_matching_flow(v[0], v[1])
    assert flow.shape == (6, 6, 2)
    inner = flow[1:-1, 1:-1]
    assert torch.equal(inner[..., 0], torch.full_like(inner[..., 0], 2.0))
    assert torch.equal(inner[..., 1], torch.full_like(inner[..., 1], 1.0))


def test_dynamic_degree_known_answers() -> None:
    v = _textured_shifts(2, 1)
    assert video.dynamic_degree(v, flow="block") == pytest.approx(math.sqrt(5) / 48, abs=1e-6)
    static = v[:1].expand(3, -1, -1, -1).clone()
    assert video.dynamic_degree(static, flow="block") == 0.0
    with pytest.raises(ValueError, match="unknown optical-flow backend 'raft'"):
        video.dynamic_degree(v, flow="raft")


def test_testbed_classifier_features_shapes_and_frames() -> None:
    from dit_accel.testbed.classifier import AttributeClassifier, ClassifierConfig

    torch.manual_seed(0)
    net = TestbedClassifierFeatures(AttributeClassifier(ClassifierConfig(width=8, feature_dim=32, input_size=32)))
    vids = _video(t=4, h=32, w=32)[None].repeat(2, 1, 1, 1, 1)
    f = net(vids)
    assert f.shape == (2, 32) and torch.allclose(f[0], f[1])
    assert net(vids[:, :2]).shape == (2, 32)  # short clips are padded with their last frame
    frames = net.frame_features(vids[0])
    assert frames.shape == (4, 32)
    with pytest.raises(ValueError, match=r"\(N, T, 3, H, W\)"):
        net(vids[0])
