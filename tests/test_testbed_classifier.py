"""Tests of the testbed attribute classifier (CPU, tiny configurations)."""

from __future__ import annotations

import pytest
import torch

from dit_accel.testbed.captions import caption_labels
from dit_accel.testbed.classifier import (
    HEADS,
    AttributeClassifier,
    ClassifierConfig,
    accuracy_from_logits,
    attribute_accuracy,
    classifier_loss,
    head_targets,
    load_classifier,
    save_classifier,
    train_classifier,
)
from dit_accel.testbed.data import make_batch

TINY = ClassifierConfig(width=8, feature_dim=32, input_size=32)


def test_output_shapes_at_any_size():
    torch.manual_seed(0)
    model = AttributeClassifier(TINY).eval()
    for t, h, w in ((4, 64, 64), (5, 48, 80), (9, 96, 64)):
        video = torch.rand(2, 3, t, h, w) * 2 - 1
        logits = model(video)
        assert set(logits) == set(HEADS)
        for name, n in HEADS.items():
            assert logits[name].shape == (2, n) and logits[name].dtype == torch.float32
        assert model.features(video).shape == (2, TINY.feature_dim)
    with pytest.raises(ValueError, match="too small"):
        model(torch.zeros(1, 3, 2, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model(torch.zeros(1, 4, 4, 64, 64))


def test_default_size_is_small():
    n = sum(p.numel() for p in AttributeClassifier().parameters())
    assert 0.5e6 <= n <= 2e6


def test_accuracy_definition_cannot_be_gamed():
    labels = caption_labels(
        [
            "a red circle moving left and a blue star bouncing on a striped background",
            "a small green square pulsing on a plain background",
        ]
    )
    targets = head_targets(labels)
    assert targets["shape"][0].sum() == 2 and targets["shape"][1].sum() == 1
    perfect = {n: (t.float() * 10 if t.ndim == 2 else torch.nn.functional.one_hot(t, HEADS[n]).float() * 10)
               for n, t in targets.items()}
    acc = accuracy_from_logits(perfect, labels)
    assert all(v == 1.0 for v in acc.values()), acc
    # Everything scored "present" (a constant ranking) only gets the classes the ranking happens to put first.
    everything = {n: torch.ones(2, HEADS[n]) for n in HEADS}
    acc = accuracy_from_logits(everything, labels)
    assert acc["shape"] < 0.5 and acc["mean"] < 0.5
    # One of two objects right: half credit.
    half = dict(perfect)
    half["shape"] = perfect["shape"].clone()
    half["shape"][0] = torch.zeros(HEADS["shape"])
    half["shape"][0, 0] = 5.0  # circle (right) first, then square (wrong) instead of star
    half["shape"][0, 1] = 4.0
    assert accuracy_from_logits(half, labels)["shape"] == pytest.approx(0.75)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    model = AttributeClassifier(TINY).eval()
    save_classifier(model, tmp_path)
    loaded = load_classifier(tmp_path)
    assert loaded.config == TINY
    video = torch.rand(1, 3, 4, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded.features(video), model.features(video))
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        load_classifier(tmp_path / "missing")


def test_configs_saved_before_the_summaries_load_without_them(tmp_path):
    import dataclasses
    import json

    old = AttributeClassifier(dataclasses.replace(TINY, motion_summaries=False, background_summaries=False)).eval()
    save_classifier(old, tmp_path, dtype=torch.float16)
    config_file = tmp_path / "classifier_config.json"
    fields = json.loads(config_file.read_text())
    del fields["motion_summaries"], fields["background_summaries"]
    config_file.write_text(json.dumps(fields))
    loaded = load_classifier(tmp_path)
    assert not loaded.config.motion_summaries and not loaded.config.background_summaries
    assert loaded.features(torch.zeros(1, 3, 4, 32, 32)).shape == (1, TINY.feature_dim)
    assert AttributeClassifier(TINY).config.motion_summaries  # new models have them


def test_short_training_reduces_loss():
    fixed = make_batch(16, 4, 32, 32, seed=99)
    torch.manual_seed(0)
    before = classifier_loss(AttributeClassifier(TINY).eval()(fixed.video), fixed.labels).item()
    model, log = train_classifier(
        80, 8, "cpu", sizes=((4, 32),), log_every=40, config=TINY, lr=5e-3, seed=0, verbose=False
    )
    assert [entry["step"] for entry in log] == [40, 80]
    assert {"loss", "seconds", "acc_mean", "acc_shape"} <= set(log[0])
    with torch.no_grad():
        after = classifier_loss(model(fixed.video), fixed.labels).item()
    assert after < 0.93 * before, (before, after)
    acc = attribute_accuracy(model, fixed.video, fixed.labels, batch_size=5)
    assert set(acc) == set(HEADS) | {"mean"} and all(0.0 <= v <= 1.0 for v in acc.values())


def test_training_stops_at_the_time_budget():
    _, log = train_classifier(10**6, 2, "cpu", sizes=((4, 32),), log_every=1, max_seconds=0.5, config=TINY,
                              verbose=False)
    assert 1 <= len(log) < 10**4
    assert log[-1]["lr"] < 2e-3  # the schedule followed the time budget towards its end
    with pytest.raises(ValueError, match="max_seconds"):
        train_classifier(1, 1, "cpu", max_seconds=0.0, config=TINY)
