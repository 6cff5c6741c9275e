"""The draft selector's query sub-pooling and temperature, and the exact-mass calibration of
``temporal_skip`` / ``combo`` (refresh plans from the warm-up step's exact block mass)."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_helpers import call_at, hand_context, mask_bool, smooth_qk

import dit_accel
from dit_accel.attention.blocks import permute_tokens
from dit_accel.attention.draft_estimate import draft_estimate, query_sub_means, top_p_keep
from dit_accel.attention.oracle import block_mass
from dit_accel.attention.temporal_skip import TemporalSkipState
from dit_accel.attention.tiling import sequence_order, visual_order

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = dict(similarity_threshold=-1.0, top_p=0.9, min_blocks_fraction=0.0)


def test_query_sub_means_contiguous_path_equals_gather():
    x = torch.randn(1, 2, 1024, 64)
    perm = visual_order((4, 16, 16))  # 2x8x8 tiles: runs of 4 tokens are contiguous in raster order
    fast, counts = query_sub_means(x, perm, 4)
    slow = permute_tokens(x, perm).unflatten(2, (256, 4)).mean(-2)
    assert torch.allclose(fast, slow, atol=1e-5) and counts.eq(4).all()
    # a ragged sequence in a shuffled order: sub-blocks past the end have count 0
    perm = torch.randperm(390, generator=torch.Generator().manual_seed(0))
    means, counts = query_sub_means(x[:, :, :390], perm, 8)
    assert means.shape == (1, 2, 64, 64) and counts.sum() == 390 and counts[48] == 6 and not counts[49:].any()
    assert torch.allclose(means[:, :, 3], x[:, :, perm[24:32]].mean(2), atol=1e-5)


def test_draft_sub_pooling_map():
    q, k = smooth_qk()
    whole = draft_estimate(q, k, query_pool=128, **OPTS)
    # pooling the same query block twice finer averages the sub-blocks' maps (query_pool 128 = classic)
    subs = draft_estimate(q, k, query_pool=64, **OPTS)
    assert torch.allclose(subs.probs.sum(-1), torch.ones(1, 2, 8), atol=1e-5)
    assert not torch.allclose(subs.probs, whole.probs)
    # sub-pooling of identical tokens equals whole-block pooling
    qc = q.unflatten(2, (8, 128)).mean(3, keepdim=True).expand(-1, -1, -1, 128, -1).flatten(2, 3).contiguous()
    assert torch.allclose(draft_estimate(qc, k, query_pool=4, **OPTS).probs,
                          draft_estimate(qc, k, query_pool=128, **OPTS).probs, atol=1e-5)
    # a temperature above 1 flattens the map (higher entropy), never NaN
    hot = draft_estimate(q, k, temperature=4.0, **OPTS).probs
    ent = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    assert ent(hot) > ent(whole.probs) and torch.isfinite(hot).all()


@pytest.mark.parametrize("bad", [0, 3, 256, True, 4.0])
def test_bad_query_pool_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="query_pool"):
        dit_accel.get_method("draft", query_pool=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), None])
def test_bad_temperature_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="temperature"):
        dit_accel.get_method("draft", temperature=bad)


@pytest.mark.parametrize("name", ["temporal_skip", "combo"])
def test_calibration_on_last_warmup_step_plans_refreshes(name):
    method = dit_accel.get_method(name, dense_warmup=0.2, dense_first_layers=0, dense_last_step=False, calibrate=True,
                                  refresh_period=2, skip_threshold=-math.inf, drift_check=False, **OPTS)
    ctx = hand_context(num_steps=10)  # warm-up: steps 0 and 1
    q, k = smooth_qk()
    assert method.plan(q, k, call_at(ctx, 0, 1024)) is None and ctx.method_state(1, "cond", TemporalSkipState).mass is None
    call = call_at(ctx, 1, 1024)
    assert method.plan(q, k, call) is None and call.extra_stats["calibrated"] is True
    perm = sequence_order(ctx.layout(1024, 0, "none"), 1024, q.device) if name == "combo" else None
    mass = block_mass(permute_tokens(q, perm), permute_tokens(k, perm))
    assert torch.allclose(ctx.method_state(1, "cond", TemporalSkipState).mass, mass, atol=1e-5)
    plan = method.plan(q, k, call_at(ctx, 2, 1024))  # refresh: top-p of the mean of mass and draft map
    keep = mask_bool(plan if name == "temporal_skip" else plan.mask)
    est = draft_estimate(q, k, perm=perm, query_pool=4, temperature=1.6, **OPTS)  # the config defaults
    expected = top_p_keep(0.5 * (mass + est.probs), 0.9, 1) | est.protect
    assert torch.equal(keep, expected)
    # without calibration the refresh is the draft's own plan
    plain = dit_accel.get_method(name, dense_warmup=0.2, dense_first_layers=0, dense_last_step=False,
                                 skip_threshold=-math.inf, drift_check=False, calibrate=False, **OPTS)
    ctx2 = hand_context(num_steps=10)
    for step in (0, 1):
        plain.plan(q, k, call_at(ctx2, step, 1024))
    plan2 = plain.plan(q, k, call_at(ctx2, 2, 1024))
    assert ctx2.method_state(1, "cond", TemporalSkipState).mass is None
    assert torch.equal(mask_bool(plan2 if name == "temporal_skip" else plan2.mask), est.keep)


def test_calibration_without_warmup_happens_at_first_refresh():
    method = dit_accel.get_method("temporal_skip", dense_warmup=0.0, dense_first_layers=0, dense_last_step=False,
                                  skip_threshold=-math.inf, drift_check=True, drift_tolerance=0.05, calibrate=True,
                                  **OPTS)
    ctx = hand_context(num_steps=None)
    q, k = smooth_qk()
    call = call_at(ctx, 0, 1024)
    method.plan(q, k, call)
    assert call.extra_stats["calibrated"] is True and ctx.method_state(1, "cond", TemporalSkipState).mass is not None
    call = call_at(ctx, 1, 1024)  # same content: the calibrated plan does not count as drift
    method.plan(q, k, call)
    assert call.extra_stats["drift_rows"] == 0


def test_tile_statistics_only_when_they_can_skip():
    assert dit_accel.get_method("combo").needs_tile_stats
    assert not dit_accel.get_method("combo", skip_threshold=-math.inf).needs_tile_stats
    assert not dit_accel.get_method("draft").needs_tile_stats


def test_draft_map_built_in_chunks_equals_the_whole_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounding the sub-query map's memory (a few query blocks at a time) changes no value."""
    from dit_accel.attention import draft_estimate as draft

    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 128 * 9 + 37, 64), torch.randn(2, 3, 128 * 9 + 37, 64)
    kwargs = dict(top_p=0.9, min_blocks_fraction=0.1, similarity_threshold=0.3, query_pool=4)
    whole = draft.draft_estimate(q, k, **kwargs)
    for elements in (1, 2 * 3 * 32 * 10 * 2):  # one query block per chunk; two per chunk
        monkeypatch.setattr(draft, "_DRAFT_MAP_CHUNK_ELEMENTS", elements)
        chunked = draft.draft_estimate(q, k, **kwargs)
        assert torch.equal(chunked.probs, whole.probs)
        assert torch.equal(chunked.keep, whole.keep)
