"""Tests of the testbed's procedural videos and captions (CPU, tiny sizes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dit_accel.testbed.captions import (
    ATTRIBUTES,
    MAX_OBJECTS,
    VOCAB,
    Scene,
    SceneObject,
    caption_labels,
    heldout_table,
    is_heldout,
    make_caption,
    parse_caption,
    scenes_from_labels,
    tokenize,
)
from dit_accel.testbed.data import VideoBatch, make_batch, render_from_labels, sample_labels


def test_batch_shapes_range_and_labels():
    batch = make_batch(6, 5, 32, 48, seed=3)
    assert isinstance(batch, VideoBatch)
    assert batch.video.shape == (6, 3, 5, 32, 48)
    assert batch.video.dtype == torch.float32
    assert batch.video.min() >= -1.0 and batch.video.max() <= 1.0
    # Not a flat image: backgrounds are dark, objects bright.
    assert batch.video.max() > 0.5 and batch.video.min() < -0.5
    assert len(batch.captions) == 6
    for attribute in ("shape", "color", "size", "motion"):
        assert batch.labels[attribute].shape == (6, MAX_OBJECTS)
    assert batch.labels["background"].shape == (6,)
    count = batch.labels["count"]
    assert ((count >= 1) & (count <= MAX_OBJECTS)).all()
    present = batch.labels["shape"] >= 0
    assert torch.equal(present.sum(dim=1), count)
    # Captions and labels agree.
    parsed = caption_labels(batch.captions)
    for key, value in parsed.items():
        assert torch.equal(value, batch.labels[key]), key


def test_deterministic_by_seed_and_generator():
    a = make_batch(3, 4, 24, 24, seed=11)
    b = make_batch(3, 4, 24, 24, seed=11)
    c = make_batch(3, 4, 24, 24, seed=12)
    assert torch.equal(a.video, b.video) and a.captions == b.captions
    assert not torch.equal(a.video, c.video)
    g = torch.Generator().manual_seed(11)
    d = make_batch(3, 4, 24, 24, generator=g)
    assert torch.equal(a.video, d.video)
    with pytest.raises(ValueError, match="either generator or seed"):
        make_batch(1, 2, 16, 16, seed=1, generator=torch.Generator())


def test_render_from_labels_matches_caption_content():
    labels = caption_labels(["a small red circle moving left on a plain background"])
    video = render_from_labels(labels, 4, 32, 32, seed=0)
    assert video.shape == (1, 3, 4, 32, 32)
    rgb = (video[0, :, 0] + 1) / 2  # (3, H, W)
    reddest = (rgb[0] - rgb[1:].mean(0)).max()
    assert reddest > 0.6  # a saturated red object is drawn


def test_object_mask_covers_the_objects_and_nothing_else():
    batch = make_batch(4, 3, 32, 32, seed=21)
    mask = batch.object_mask
    assert mask.shape == (4, 1, 3, 32, 32) and mask.min() >= 0 and mask.max() <= 1
    # Every scene has at least one object, fully covering some pixel in every frame.
    assert (mask.amax(dim=(-1, -2)) > 0.99).all()
    # Asking for the mask does not change the video.
    video, _ = render_from_labels(batch.labels, 3, 32, 32, seed=5, return_mask=True)
    assert torch.equal(video, render_from_labels(batch.labels, 3, 32, 32, seed=5))
    # One white object on a plain dark background: the mask is where the pixel is bright (edges aside).
    labels = caption_labels(["a large white square moving left on a plain background"])
    video, mask = render_from_labels(labels, 2, 64, 64, seed=3, return_mask=True)
    bright = video.mean(dim=1, keepdim=True) > 0.0
    assert (bright != (mask > 0.5)).float().mean() < 0.01
    assert 0.02 < (mask > 0.5).float().mean() < 0.2  # a small object, not the frame


def test_straight_motion_moves_in_the_named_direction():
    captions = [f"a large white square moving {d} on a plain background" for d in ("left", "right", "up", "down")]
    video = render_from_labels(caption_labels(captions), 8, 64, 64, seed=5)
    bright = (video.mean(dim=1) > 0.5).float()  # (B, T, H, W): the white object
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    area = bright.sum(dim=(-1, -2))
    cx = (bright * xs).sum(dim=(-1, -2)) / area
    cy = (bright * ys).sum(dim=(-1, -2)) / area
    dx, dy = cx[:, -1] - cx[:, 0], cy[:, -1] - cy[:, 0]
    assert dx[0] < -8 and dx[1] > 8 and dy[2] < -8 and dy[3] > 8
    assert dy[:2].abs().max() < 1 and dx[2:].abs().max() < 1


def test_heldout_split_is_disjoint_from_training():
    table = heldout_table()
    share = table.float().mean().item()
    assert 0.05 < share < 0.15
    train = make_batch(64, 1, 8, 8, seed=0, split="train")
    held = make_batch(64, 1, 8, 8, seed=0, split="heldout")
    assert not set(train.captions) & set(held.captions)
    for labels, first_only in ((train.labels, False), (held.labels, True)):
        for i in range(64):
            for j in range(int(labels["count"][i])):
                key = tuple(ATTRIBUTES[a][int(labels[a][i, j])] for a in ("shape", "color", "motion"))
                flag = is_heldout(*key, ATTRIBUTES["background"][int(labels["background"][i])])
                assert flag == (first_only and j == 0)
    with pytest.raises(ValueError, match="unknown split"):
        make_batch(1, 1, 8, 8, seed=0, split="test")


def test_at_least_1000_distinct_captions():
    a = ATTRIBUTES
    captions = {
        make_caption(Scene((SceneObject(s, c, z, m),), b))
        for s, c, z, m, b in itertools.product(a["shape"], a["color"], a["size"], a["motion"], a["background"])
    }
    assert len(captions) >= 1000
    sampled = sample_labels(512, seed=1)
    assert len({make_caption(s) for s in scenes_from_labels(sampled)}) > 400


def test_parse_caption_round_trip():
    scene = Scene(
        (SceneObject("star", "orange", "small", "up-left"), SceneObject("ring", "blue", "medium", "bouncing")),
        "checkered",
    )
    caption = make_caption(scene)
    assert caption == "a small orange star moving up-left and a blue ring bouncing on a checkered background"
    parsed = parse_caption(caption)
    assert parsed["shape"] == ["star", "ring"] and parsed["size"] == ["small", "medium"]
    assert parsed["motion"] == ["up-left", "bouncing"] and parsed["background"] == "checkered"
    assert parsed["count"] == 2
    assert scenes_from_labels(caption_labels([caption]))[0] == scene
    for bad in ("a red circle on a plain background", "a red circle moving sideways on a plain background",
                "a red circle pulsing on a striped", "a red circle pulsing and a red circle pulsing and a red "
                "circle pulsing and a red circle pulsing on a plain background"):
        with pytest.raises(ValueError, match="grammar"):
            parse_caption(bad)


def test_tokenize_and_unknown_words():
    ids, mask = tokenize(["a red circle pulsing on a plain background", "An orange star bouncing on a dotted background."],
                         max_length=12)
    assert ids.shape == (2, 12) and mask.shape == (2, 12) and mask.dtype == torch.bool
    assert mask[0].sum() == 8 and mask[1].sum() == 8
    assert VOCAB[0] == "<pad>" and (ids[~mask] == 0).all() and (ids[mask] > 0).all()
    assert [VOCAB[i] for i in ids[1, :3]] == ["an", "orange", "star"]
    with pytest.raises(ValueError, match="'purple'.*vocabulary.*circle"):
        tokenize(["a purple circle pulsing on a plain background"])
    with pytest.raises(ValueError, match="max_length"):
        tokenize(["a red circle pulsing on a plain background"], max_length=4)
