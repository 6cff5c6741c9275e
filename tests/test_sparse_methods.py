"""Sparse methods (draft, permuted, temporal_skip, combo, oracle, window): equal to dense at full density,
exact permutations, safety valves, statistics, quality knob, clear errors, no NaNs."""

from __future__ import annotations

import math

import pytest
import torch
from sparse_helpers import FULL, call_at, generate, hand_context, mask_bool, smooth_qk, tiny_testbed

import dit_accel
from dit_accel.attention.blocks import permute_tokens, pool_matrix
from dit_accel.attention.draft_estimate import block_pool, draft_estimate, top_p_keep
from dit_accel.attention.oracle import block_mass, mass_coverage
from dit_accel.attention.permuted import KMeansState, kmeans
from dit_accel.attention.quality import QUALITY_LEVELS, quality_thresholds
from dit_accel.attention.tiling import block_boxes, choose_tile, sequence_order, token_coords, visual_order
from dit_accel.kernels import block_sparse_attention

TOL = 1e-4
"""Largest |difference| of final latents allowed against dense (float32 CPU; observed ~5e-6)."""

FULL_DENSITY = {
    "draft": dict(FULL),
    "permuted_tile": dict(FULL, order="tile"),
    "permuted_kmeans": dict(FULL, order="kmeans"),
    "temporal_skip": dict(FULL, skip_threshold=-math.inf),
    "combo_tile": dict(FULL, skip_threshold=-math.inf),
    "combo_kmeans": dict(FULL, skip_threshold=-math.inf, order="kmeans", refresh_period=2),
    "oracle": dict(FULL, similarity_threshold=None),
    "window": dict(FULL, top_p=None, similarity_threshold=None, frame_radius=100, space_radius=100),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_testbed()


@pytest.fixture(scope="module")
def dense(pipe):
    return generate(pipe)


def _options(key: str) -> tuple[str, dict]:
    name = key.rsplit("_", 1)[0] if key.split("_")[-1] in ("tile", "kmeans") else key
    return name, {k: v for k, v in FULL_DENSITY[key].items() if v is not None}


@pytest.mark.parametrize("key", sorted(FULL_DENSITY))
def test_full_density_equals_dense(pipe, dense, key):
    name, options = _options(key)
    handle = dit_accel.apply(pipe, attention=dit_accel.get_method(name, **options))
    out = generate(pipe)
    stats = handle.stats()
    dit_accel.remove(pipe)
    assert (out - dense).abs().max().item() <= TOL
    assert {s["backend"] for s in stats} == {"block_sparse"} and {s["density"] for s in stats} == {1.0}


def test_joint_text_tokens_stay_dense_and_full_density_equals_dense():
    """FLUX (text first): text rows/columns always kept; at full density the output equals the stock model."""
    from conftest import TINY_CASES, flux_image_ids, run_model

    model = TINY_CASES["flux"].build()
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 32 * 20, 4, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        img_ids=flux_image_ids(32, 20), txt_ids=torch.zeros(8, 3),
    )
    reference = run_model(model, inputs)
    for name, options in (("combo", dict(FULL, skip_threshold=-math.inf)), ("permuted", dict(FULL, order="kmeans"))):
        dit_accel.apply(model, attention=dit_accel.get_method(name, **options))
        assert (run_model(model, inputs) - reference).abs().max().item() <= TOL
        dit_accel.remove(model)
    # sparse: text block rows/columns are kept whatever the draft says
    ctx = hand_context(grid=(1, 32, 20), num_steps=None)
    q, k = smooth_qk((1, 32, 20))
    q = torch.cat([torch.randn(1, 2, 8, 64), q], dim=2)
    k = torch.cat([torch.randn(1, 2, 8, 64), k], dim=2)
    method = dit_accel.get_method("permuted", top_p=0.3, min_blocks_fraction=0.0, similarity_threshold=-1.0,
                                  dense_warmup=0.0, dense_first_layers=0)
    plan = method.plan(q, k, call_at(ctx, 1, q.shape[2], text_tokens=8, text_position="first"))
    keep = mask_bool(plan.mask)
    assert keep[..., 0, :].all() and keep[..., :, 0].all() and not keep.all()
    assert torch.equal(plan.perm[:8], torch.arange(8))  # text tokens stay in place


@pytest.mark.parametrize("grid", [(4, 16, 16), (21, 30, 52), (13, 7, 9), (1, 3, 3), (2, 10, 10)])
def test_tile_permutation_then_inverse_is_identity(grid):
    F, H, W = grid
    n = F * H * W
    perm = visual_order(grid)
    if perm is None:  # no tile fits (fewer than 64 tokens per plane): identity fallback
        assert choose_tile(grid) is None
        return
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    x = torch.randn(1, 1, n, 64)
    y = permute_tokens(x, perm)
    assert torch.equal(permute_tokens(y, torch.argsort(perm)), x)
    # full tiles come first and each 128-token block of them is one compact box
    choice = choose_tile(grid)
    tf, th, tw = choice.tile
    if choice.coverage == 1.0 and tf * th * tw == 128:
        coords = torch.stack([perm // (H * W), perm // W % H, perm % W], -1).float()
        lo, hi = block_boxes(coords)
        assert torch.equal(hi - lo + 1, torch.tensor([tf, th, tw]).float().expand_as(lo))


def test_kmeans_permutation_is_exact_and_warm_started():
    ctx = hand_context(grid=(4, 16, 16))
    q, k = smooth_qk()
    method = dit_accel.get_method("permuted", order="kmeans", dense_warmup=0.0, dense_first_layers=0, top_p=0.9)
    call = call_at(ctx, 1, q.shape[2])
    plan = method.plan(q, k, call)
    perm = plan.perm
    assert perm.shape == (1, 2, 1024)
    for h in range(2):
        assert torch.equal(torch.sort(perm[0, h]).values, torch.arange(1024))
    v = torch.randn_like(q)
    back = permute_tokens(permute_tokens(v, perm), torch.argsort(perm, dim=-1))
    assert torch.equal(back, v)
    first = ctx.method_state(1, "cond", KMeansState).centroids.clone()
    method.plan(q, k, call_at(ctx, 2, q.shape[2]))
    second = ctx.method_state(1, "cond", KMeansState).centroids
    # warm start: the same keys barely move converged centroids
    assert first.shape == second.shape == (1, 2, 8, 64)
    assert (second - first).abs().max() < (first.abs().max() * 0.5)


def test_kmeans_lowers_within_cluster_spread():
    x = torch.cat([torch.randn(1, 1, 50, 8) + 10, torch.randn(1, 1, 50, 8) - 10], dim=2)
    labels, cents = kmeans(x, x[:, :, [0, 1]], iters=5)
    assert set(labels[0, 0, :50].tolist()) != set(labels[0, 0, 50:].tolist())
    assert torch.allclose(cents.abs().mean(), torch.tensor(10.0), atol=1.0)


def test_draft_pooling_selection_and_fallbacks():
    q, k = smooth_qk()
    mean, sim, counts = block_pool(k)
    assert torch.allclose(mean[0, 0, 0], k[0, 0, :128].mean(0), atol=1e-5)
    assert counts.tolist() == [128.0] * 8 and (sim <= 1 + 1e-5).all()
    # in a permuted order: the averaging-matrix GEMM equals the gather-and-sum, also with a ragged block
    # and with q in diffusers' (B, S, H, D) memory layout
    perm = visual_order((3, 10, 13))
    x = torch.randn(1, 390, 2, 64).transpose(1, 2)
    by_gather = block_pool(x, perm)
    by_gemm = block_pool(x, perm, pool_matrix(perm))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(by_gather, by_gemm))
    assert torch.allclose(by_gather[0][0, 1, -1], x[0, 1, perm[384:]].mean(0), atol=1e-5)
    est = draft_estimate(q, k, top_p=0.5, min_blocks_fraction=0.0, similarity_threshold=-1.0)
    assert torch.allclose(est.probs.sum(-1), torch.ones(1, 2, 8), atol=1e-5)
    assert est.keep.diagonal(dim1=-2, dim2=-1).all() and not est.keep.all()
    kept_mass = (est.probs * est.keep).sum(-1)
    assert (kept_mass >= 0.5 - 1e-6).all()
    # a block whose tokens point every which way is computed densely (row and column)
    k2 = k.clone()
    k2[:, :, 128:256] = torch.randn(1, 2, 128, 64) * 5
    est2 = draft_estimate(q, k2, top_p=0.5, min_blocks_fraction=0.0, similarity_threshold=0.5)
    assert est2.dense_cols[..., 1].all() and est2.keep[..., :, 1].all()
    # top-p keeps the fewest blocks reaching the share, at least the minimum, everything at 1
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_keep(probs, 0.8, 1).tolist() == [[True, True, False, False]]
    assert top_p_keep(probs, 0.1, 3).tolist() == [[True, True, True, False]]
    assert top_p_keep(probs, 1.0, 1).all()


def test_oracle_block_mass_and_coverage():
    q, k = smooth_qk()
    mass = block_mass(q, k)
    assert torch.allclose(mass.sum(-1), torch.ones(1, 2, 8), atol=1e-5)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1)
    direct = p.view(1, 2, 8, 128, 8, 128).sum(-1).mean(3)
    assert torch.allclose(mass, direct, atol=1e-5)
    assert mass_coverage(mass, torch.ones_like(mass, dtype=torch.bool)).item() == pytest.approx(1.0, abs=1e-5)


def test_window_is_local_in_tile_order():
    ctx = hand_context(grid=(4, 16, 16))
    q, k = smooth_qk()
    method = dit_accel.get_method("window", frame_radius=0, space_radius=0, dense_warmup=0.0, dense_first_layers=0)
    plan = method.plan(q, k, call_at(ctx, 1, 1024))
    keep = mask_bool(plan.mask)[0, 0]
    # tile (4, 4, 8): 8 tiles side by side; radius 0 keeps a tile and the tiles touching it
    assert keep.diagonal().all() and 0 < keep.float().mean() < 1
    coords = token_coords(ctx.layout(1024, 0, "none"), 1024, "cpu")
    assert torch.isfinite(coords).all()
    unknown = hand_context(grid=None)
    assert method.plan(q, k, call_at(unknown, 1, 1024)) is None  # documented fallback: dense


def test_safety_valves_and_stats_reach_the_run_log(pipe):
    handle = dit_accel.apply(pipe, attention=dit_accel.get_method(
        "combo", min_seq_len=0, dense_warmup=0.25, top_p=0.9, refresh_period=2, dense_above=None))
    generate(pipe)  # 4 steps: step 0 warm-up, step 3 last step, layer 0 always dense
    stats = handle.stats()
    dit_accel.remove(pipe)
    by = {(s["step"], s["layer"], s["branch"]): s for s in stats}
    assert by[(0, 1, "cond")]["sparse_off"] == "warmup" and by[(0, 1, "cond")]["dense_reason"] == "method"
    assert by[(3, 2, "cond")]["sparse_off"] == "last_step"
    assert all(by[(s, 0, "cond")]["sparse_off"] == "first_layers" for s in range(4))
    sparse = [s for s in stats if s["dense_reason"] is None]
    assert sparse and all(s["order"] == "tile" for s in sparse)
    assert all(("dense_rows" in s) if s["refresh"] else ("skipped_tiles" in s and "drift_rows" in s) for s in sparse)
    assert [by[(st, 1, "cond")]["refresh"] for st in (1, 2)] == [True, False]
    assert "newly_skipped" in by[(1, 1, "cond")]


def test_quality_knob_maps_monotonically():
    values = [quality_thresholds(QUALITY_LEVELS[n]) for n in ("turbo", "fast", "balanced", "quality", "max")]
    for a, b in zip(values, values[1:]):
        assert a["top_p"] < b["top_p"] and a["skip_threshold"] >= b["skip_threshold"]
        assert a["dense_warmup"] <= b["dense_warmup"]
    method = dit_accel.get_method("draft", quality=0.5, top_p=0.7)
    assert method.cfg.resolved("top_p") == 0.7  # explicit value wins over the knob
    assert method.cfg.resolved("min_blocks_fraction") == quality_thresholds(0.5)["min_blocks_fraction"]


@pytest.mark.parametrize("name, options, match", [
    ("nope", {}, r"unknown attention method 'nope'; registered methods: \[.*'combo'"),
    ("draft", {"top_p": 0.0}, r"top_p must be in \(0.0, 1.0\], got 0.0"),
    ("draft", {"top_p": 1.5}, r"top_p must be in \(0.0, 1.0\], got 1.5"),
    ("draft", {"top_p": float("nan")}, r"top_p must be a number in \(0.0, 1.0\], got nan"),
    ("combo", {"quality": 2}, r"quality must be a float in \[0, 1\] or one of"),
    ("combo", {"quality": "ultra"}, r"unknown quality level 'ultra'; allowed: \['balanced'"),
    ("permuted", {"tile": (3, 3, 3)}, r"tile \(3, 3, 3\) has 27 tokens; allowed volumes: \[64, 128, 256\]"),
    ("permuted", {"order": "hilbert"}, r"order must be one of \('tile', 'kmeans'\), got 'hilbert'"),
    ("temporal_skip", {"skip_threshold": 1.0}, r"skip_threshold must be in \[-inf, 0.0\], got 1.0"),
    ("temporal_skip", {"refresh_period": 0}, r"refresh_period must be in \[1, 1000000\], got 0"),
    ("window", {"decay": "cosine"}, r"decay must be one of \('none', 'radial'\)"),
    ("window", {"space_radius": -1}, r"space_radius must be in \[0, 1000000\], got -1"),
    ("oracle", {"similarity_threshold": 0.3}, r"unknown option\(s\) \['similarity_threshold'\] for attention method 'oracle'"),
    ("draft", {"dense_warmup": 1.2}, r"dense_warmup must be in \[0.0, 1.0\], got 1.2"),
    ("combo", {"map_backend": "cuda"}, r"map_backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
])
def test_bad_configs_raise_clear_errors(name, options, match):
    with pytest.raises(ValueError, match=match):
        dit_accel.get_method(name, **options)


def test_a_shared_order_keeps_its_kernel_index_and_a_per_head_order_does_not():
    """The tile order is built once per grid: every plan of it carries the same int32 kernel index (the kernel
    validates an index once per tensor); a k-means order is per call and leaves the conversion to the route."""
    q, k = smooth_qk()
    ctx = hand_context()
    tile = dit_accel.get_method("permuted", **FULL)
    first, second = tile.plan(q, k, call_at(ctx, 1, 1024)), tile.plan(q, k, call_at(ctx, 2, 1024))
    assert first.index is second.index and first.index.dtype == torch.int32
    assert torch.equal(first.index.long(), first.perm)
    per_head = dit_accel.get_method("permuted", order="kmeans", **FULL).plan(q, k, call_at(ctx, 3, 1024))
    assert per_head.perm.shape == (1, 2, 1024) and per_head.index is None


@pytest.mark.parametrize("name", ["draft", "permuted", "combo", "temporal_skip", "oracle", "window"])
def test_extreme_settings_and_unknown_grids_give_finite_outputs(name):
    options = dict(dense_warmup=0.0, dense_first_layers=0)
    if name != "window":
        options.update(top_p=1e-6, min_blocks_fraction=0.0)
    if name in ("draft", "permuted", "combo", "temporal_skip"):
        options["similarity_threshold"] = -1.0
    method = dit_accel.get_method(name, **options)
    q, k = smooth_qk((3, 10, 13))  # 390 tokens: ragged last block, tile does not divide the grid
    v = torch.randn_like(q)
    for grid in ((3, 10, 13), None):
        ctx = hand_context(grid=grid)
        for step in (1, 2):
            plan = method.plan(q, k, call_at(ctx, step, q.shape[2]))
            if plan is None:
                assert name == "window" and grid is None
                continue
            mask, perm = (plan.mask, plan.perm) if hasattr(plan, "perm") else (plan, None)
            out = block_sparse_attention(permute_tokens(q, perm), permute_tokens(k, perm), permute_tokens(v, perm), mask)
            assert torch.isfinite(out).all()
    assert sequence_order(hand_context(grid=None).layout(390, 0, "none"), 390, "cpu") is None


@pytest.mark.parametrize("name, options", [("permuted", {"order": "tile"}), ("permuted", {"order": "kmeans"}),
                                           ("draft", {}), ("window", None)])
def test_sparse_output_equals_token_masked_attention(name, options):
    """The planned mask is applied in the planned order: permute, kernel, un-permute equals exact attention with
    the token-level mask that the block mask implies in the model's order."""
    q, k = smooth_qk()
    v = torch.randn_like(q)
    if options is None:
        options = dict(frame_radius=0, space_radius=4)
    else:
        options = dict(options, top_p=0.7, min_blocks_fraction=0.0, similarity_threshold=-1.0)
    method = dit_accel.get_method(name, dense_warmup=0.0, dense_first_layers=0, **options)
    plan = method.plan(q, k, call_at(hand_context(), 1, 1024))
    mask, perm = (plan.mask, plan.perm) if hasattr(plan, "perm") else (plan, None)
    keep = mask_bool(mask).expand(1, 2, 8, 8)
    assert not keep.all()
    out = block_sparse_attention(permute_tokens(q, perm), permute_tokens(k, perm), permute_tokens(v, perm), mask)
    if perm is not None:
        out = permute_tokens(out, torch.argsort(perm, dim=-1))
    order = torch.arange(1024).expand(1, 2, 1024) if perm is None else perm.expand(1, 2, 1024)
    block_of = torch.argsort(order, dim=-1) // 128  # planned block of every original token
    rows = torch.gather(keep, 2, block_of[..., None].expand(-1, -1, -1, 8))
    token_mask = torch.gather(rows, 3, block_of[:, :, None, :].expand(-1, -1, 1024, -1))
    logits = (q @ k.transpose(-1, -2)) / 8.0
    expected = torch.softmax(logits.masked_fill(~token_mask, float("-inf")), -1) @ v
    assert (out - expected).abs().max().item() < 1e-4
