"""TestbedPipeline: save/load round trip, determinism, input validation, training pieces, shipped weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_accel.testbed import WEIGHTS_DIR, captions, load_testbed_pipeline
from dit_accel.testbed import autoencoder as ae_module
from dit_accel.testbed import pipeline as pipeline_module
from dit_accel.testbed import text_encoder as te_module
from dit_accel.testbed.model import transformer_config

# Imported as modules: pytest would try to collect classes named Test* imported by name.
Pipe = pipeline_module.TestbedPipeline

CAPTION = "a small red circle moving left and a blue star bouncing on a striped background"


def tiny_pipeline() -> "Pipe":
    torch.manual_seed(0)
    pipe = pipeline_module.build_pipeline(
        captions.VOCAB,
        transformer_config=transformer_config(num_layers=2, num_heads=2, head_dim=24, text_dim=32, in_channels=4),
        autoencoder_config={"z_dim": 4, "block_channels": (8, 16, 16), "norm_groups": 4},
        text_encoder_config={"width": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 1},
    )
    # The training init zeroes the output and timestep projections (an untrained model predicts 0);
    # give them weights so the tests see the text and timestep reach the output.
    with torch.no_grad():
        for lin in (pipe.transformer.proj_out, pipe.transformer.condition_embedder.time_proj):
            lin.weight.normal_(std=0.05)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> "Pipe":
    p = tiny_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe: "Pipe", seed: int, **kwargs):
    args = {"num_frames": 3, "height": 32, "width": 32, "num_inference_steps": 3,
            "generator": torch.Generator().manual_seed(seed)}
    args.update(kwargs)
    return pipe(CAPTION, **args).frames


def test_output_types_and_ranges(pipe: "Pipe") -> None:
    frames = run(pipe, 0)
    assert isinstance(frames, np.ndarray) and frames.shape == (1, 3, 32, 32, 3)
    assert frames.min() >= 0.0 and frames.max() <= 1.0
    pt = run(pipe, 0, output_type="pt")
    assert tuple(pt.shape) == (1, 3, 3, 32, 32)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), frames, atol=1e-6)
    lat = run(pipe, 0, output_type="latent")
    assert tuple(lat.shape) == (1, 4, 3, 8, 8)


def test_deterministic_for_a_seed(pipe: "Pipe") -> None:
    a, b, c = run(pipe, 7), run(pipe, 7), run(pipe, 8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


def test_guidance_uses_uncond_branch(pipe: "Pipe") -> None:
    with_cfg = run(pipe, 3, guidance_scale=5.0, output_type="latent")
    no_cfg = run(pipe, 3, guidance_scale=1.0, output_type="latent")
    assert (with_cfg - no_cfg).abs().max() > 1e-6


def test_save_and_load_round_trip(pipe: "Pipe", tmp_path: Path) -> None:
    pipe.save_pretrained(tmp_path, max_shard_size="15MB")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["dit_accel.testbed.autoencoder", "TestbedAutoencoder"]
    assert index["text_encoder"] == ["dit_accel.testbed.text_encoder", "TestbedTextEncoder"]
    loaded = load_testbed_pipeline("cpu", folder=tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(pipe, 5), run(loaded, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 36}, "height must be a positive multiple of 8"),
        ({"width": 0}, "width must be a positive multiple of 8"),
        ({"num_frames": 0}, "num_frames must be an int"),
        ({"num_inference_steps": 0}, "num_inference_steps must be a positive int"),
        ({"output_type": "pil"}, "output_type must be one of"),
    ],
)
def test_bad_arguments_are_rejected(pipe: "Pipe", kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        run(pipe, 0, **kwargs)


def test_unknown_word_is_rejected(pipe: "Pipe") -> None:
    with pytest.raises(ValueError, match="unknown word 'purple'.*vocabulary"):
        pipe("a purple circle moving left on a plain background", num_frames=2, height=32, width=32,
             num_inference_steps=1)
    with pytest.raises(TypeError, match="prompt must be a str"):
        pipe(["a red circle moving left on a plain background", 3], num_frames=2, height=32, width=32)


def test_text_encoder_padding_and_unknown_checkpoint_words() -> None:
    te = te_module.TestbedTextEncoder(vocab=("<pad>", "a", "red"), max_length=6, width=16, num_heads=2, ffn_dim=32, num_layers=1)
    ids = torch.tensor([[1, 2, 0, 0]])
    out = te(ids, ids > 0)
    assert out.shape == (1, 7, 16)
    assert out[0, :3].abs().sum() > 0 and out[0, 3:].abs().sum() == 0  # begin + 2 words, then zeros
    empty = te(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(empty).all() and empty[0, 1:].abs().sum() == 0
    source = ("<pad>", "red", "blue", "a")
    np.testing.assert_array_equal(te.remap_ids(torch.tensor([[3, 1]]), source).numpy(), [[1, 2]])
    with pytest.raises(ValueError, match=r"words \['blue'\] are not in this text encoder's vocabulary"):
        te.remap_ids(torch.tensor([[2]]), source)


def test_autoencoder_shapes_and_normalisation() -> None:
    ae = ae_module.TestbedAutoencoder(z_dim=4, block_channels=(8, 16, 16), norm_groups=4, latents_mean=[1.0, 2.0, 3.0, 4.0],
                            latents_std=[2.0, 2.0, 0.5, 1.0])
    video = torch.rand(2, 3, 3, 16, 24) * 2 - 1
    z = ae.encode(video)
    assert z.shape == (2, 4, 3, 4, 6)
    assert ae.decode(z).sample.shape == video.shape
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 3, 1, 10, 16))


def test_training_steps_checkpoint_and_export(tmp_path: Path) -> None:
    from training.trainer import DiTTrainConfig, export_pipeline, flow_matching_loss, train_dit

    p = tiny_pipeline()
    cfg = DiTTrainConfig(seconds=60, total_seconds=60, max_steps=2, buckets=((32, 2, 2),),
                         curriculum=((1.01, (1.0,)),), validation_size=(32, 2), log_every=1)
    before = [t.detach().clone() for t in p.transformer.parameters()]
    state, ema = train_dit(p, cfg, torch.device("cpu"), checkpoint=tmp_path / "ckpt.pt",
                           log_path=tmp_path / "log.jsonl")
    assert state.step == 2 and (tmp_path / "ckpt.pt").is_file()
    assert any((a - b).abs().max() > 0 for a, b in zip(before, p.transformer.parameters()))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "dit"] == [1, 2]
    (session,) = [r for r in records if r["stage"] == "dit_session"]
    for key in ("val_loss", "val_direction_sensitivity", "val_high_loss", "val_high_direction_sensitivity"):
        assert math.isfinite(session[key]), key
    assert session["val_high_loss"] > 0 and session["high_sigma_share"] == cfg.high_sigma_share
    state2, _ = train_dit(p, cfg, torch.device("cpu"), checkpoint=tmp_path / "ckpt.pt", resume_full=True)
    assert state2.step == 4  # resumed at step 2
    export_pipeline(p, ema, tmp_path / "export", info={"dit": {"step": state2.step}})
    loaded = load_testbed_pipeline("cpu", folder=tmp_path / "export")
    assert loaded.transformer.dtype == torch.float32
    # The export holds the EMA weights (stored fp16), not the live ones.
    ema_first = ema.shadow[0]
    torch.testing.assert_close(next(loaded.transformer.parameters()), ema_first.half().float())
    # Loss is finite and differentiable at a tiny size.
    lat = torch.randn(1, 4, 2, 8, 8)
    loss = flow_matching_loss(loaded, lat, [CAPTION], torch.tensor([0.5]), torch.randn_like(lat))
    assert torch.isfinite(loss)


def test_sigma_sampler_high_noise_share() -> None:
    from training.trainer import sample_sigmas

    cpu = torch.device("cpu")
    plain = sample_sigmas(4000, 3.0, cpu, torch.Generator().manual_seed(0))
    # A share of 0 draws exactly what the recipe without the high-noise share drew.
    torch.testing.assert_close(sample_sigmas(4000, 3.0, cpu, torch.Generator().manual_seed(0), high_share=0.0), plain)
    high = sample_sigmas(4000, 3.0, cpu, torch.Generator().manual_seed(0), high_share=1.0, high_range=(0.9, 1.0))
    assert ((high >= 0.9) & (high < 1.0)).all()
    mixed = sample_sigmas(20000, 3.0, cpu, torch.Generator().manual_seed(0), high_share=0.3, high_range=(0.85, 1.0))
    # ~3 % of the shifted logit-normal lies above 0.95; the uniform share adds 0.3 * 1/3.
    assert 0.11 < (mixed > 0.95).float().mean() < 0.16 and 0.025 < (plain > 0.95).float().mean() < 0.04
    with pytest.raises(ValueError, match="high_share"):
        sample_sigmas(4, 3.0, cpu, high_share=1.5)
    with pytest.raises(ValueError, match="high_range"):
        sample_sigmas(4, 3.0, cpu, high_share=0.5, high_range=(0.9, 0.8))


def test_weighted_loss_is_the_mean_over_weighted_pixels() -> None:
    from training.trainer import flow_matching_loss, object_weight

    p = tiny_pipeline()
    lat, noise, sig = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 4, 2, 8, 8), torch.tensor([0.7])
    full = flow_matching_loss(p, lat, [CAPTION], sig, noise)
    torch.testing.assert_close(flow_matching_loss(p, lat, [CAPTION], sig, noise, weight=torch.ones(1, 1, 2, 8, 8)), full)
    with torch.no_grad():
        x_t = 0.3 * lat + 0.7 * noise
        pred = p.transformer(hidden_states=x_t, timestep=sig * 1000, encoder_hidden_states=p.encode_text([CAPTION], "cpu"),
                             return_dict=False)[0]
    err = (pred - (noise - lat)) ** 2
    w = torch.zeros(1, 1, 2, 8, 8)
    w[..., :4, :] = 1
    expected = err[..., :4, :].mean()
    with torch.no_grad():
        torch.testing.assert_close(flow_matching_loss(p, lat, [CAPTION], sig, noise, weight=w), expected)
    # object_weight: a latent pixel counts as soon as an object touches one of its pixels.
    cov = torch.zeros(1, 1, 1, 8, 8)
    cov[..., 0, 0] = 0.5
    torch.testing.assert_close(object_weight(cov, 4), torch.tensor([[[[[1.0, 0.0], [0.0, 0.0]]]]]))


def test_direction_contrast_is_a_hinge_on_the_reversed_caption_gap() -> None:
    from training.trainer import direction_contrast_loss, has_direction, velocity_error

    assert has_direction(CAPTION) and not has_direction("a red circle bouncing on a plain background")
    assert not has_direction("")
    p = tiny_pipeline()
    lat, noise, sig = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 4, 2, 8, 8), torch.tensor([0.9, 0.97])
    weight = torch.zeros(2, 1, 2, 8, 8)
    weight[:, :, :, 2:6, 2:6] = 1
    caps = [CAPTION, "a large white square moving up-left on a plain background"]
    with torch.no_grad():
        loss, gap = direction_contrast_loss(p, lat, caps, weight, sig, noise, margin=0.5)

        def per_video(c: list[str]) -> torch.Tensor:
            err = velocity_error(p, lat, c, sig, noise)[:, :, :, 2:6, 2:6]
            return err.mean(dim=(1, 2, 3, 4))

        true = per_video(caps)
        rev = per_video([captions.reverse_directions(c) for c in caps])
    expected_gap = rev / true - 1
    torch.testing.assert_close(gap, expected_gap.mean())
    torch.testing.assert_close(loss, torch.relu(0.5 - expected_gap).mean())
    # Once the gap exceeds the margin the term is zero (nothing to push).
    with torch.no_grad():
        none, _ = direction_contrast_loss(p, lat, caps, weight, sig, noise, margin=-1.0)
    assert none.item() == 0.0
    # Its gradient reaches the model (the text path included) when the margin is not met.
    loss, _ = direction_contrast_loss(p, lat, caps, weight, sig, noise, margin=0.5)
    loss.backward()
    assert p.text_encoder.token_embedding.weight.grad.abs().sum() > 0


def test_training_with_the_direction_contrast_logs_the_gap(tmp_path: Path) -> None:
    from training.trainer import DiTTrainConfig, train_dit

    p = tiny_pipeline()
    cfg = DiTTrainConfig(seconds=60, total_seconds=60, max_steps=3, buckets=((32, 2, 8),), curriculum=((1.01, (1.0,)),),
                         validation_size=(32, 2), log_every=1, text_dropout=0.0, direction_contrast=1.0)
    train_dit(p, cfg, torch.device("cpu"), log_path=tmp_path / "log.jsonl", seed=3)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    gaps = [r["direction_gap"] for r in records if r["stage"] == "dit" and "direction_gap" in r]
    assert gaps and all(math.isfinite(g) for g in gaps)
    (session,) = [r for r in records if r["stage"] == "dit_session"]
    assert session["direction_contrast"] == 1.0


def test_shipped_weights_load_offline_and_generate_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shipped = load_testbed_pipeline()
    shipped.set_progress_bar_config(disable=True)
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert total <= 40e6
    kwargs = {"num_frames": 2, "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "np"}
    a = shipped(CAPTION, generator=torch.Generator().manual_seed(1), **kwargs).frames
    b = shipped(CAPTION, generator=torch.Generator().manual_seed(1), **kwargs).frames
    assert a.shape == (1, 2, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_reverse_directions_swaps_only_direction_words() -> None:
    from dit_accel.testbed.captions import parse_caption, reverse_directions

    caption = "a small red circle moving up-left and a blue star bouncing on a striped background"
    flipped = reverse_directions(caption)
    assert flipped == "a small red circle moving down-right and a blue star bouncing on a striped background"
    assert reverse_directions(flipped) == caption
    assert parse_caption(flipped)["background"] == parse_caption(caption)["background"]
