"""Once-per-forward token order (``dit_accel.attention.token_order``, ``apply(token_order=...)``).

Tolerances: "forward" reorders the tokens of every block, so attention sums its keys (and the draft pools
its blocks) in another order: float32 reassociation only. Measured on these tiny models: <= 1e-5 of the
output's max magnitude; asserted at 1e-4 (relative to the max), far below any effect of a wrong order
(a token in the wrong place changes the output by O(1)).
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.attention.tiling import (
    choose_tile,
    raster_order,
    sequence_order,
    tile_permutation,
    token_coords,
    visual_order,
)
from dit_accel.attention.token_order import TOKEN_ORDER_HOOK_NAME, TOKEN_ORDERS
from dit_accel.caching import install_cache, make_cache_config
from dit_accel.context import TokenLayout
from sparse_helpers import FULL, generate, tiny_testbed
from conftest import TINY_CASES as CASES, run_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
REL_TOL = 1e-4


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL_TOL) -> bool:
    """Equal up to float reassociation: max abs difference <= rel x max magnitude."""
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.fixture(scope="module")
def pipe():
    return tiny_testbed(num_layers=2)


@pytest.fixture(scope="module")
def stock(pipe):
    return generate(pipe, steps=STEPS)


def _gen(pipe, attention, token_order, cache=None):
    handle = dit_accel.apply(pipe, attention=attention, cache=cache, token_order=token_order)
    try:
        out = generate(pipe, steps=STEPS)
        return out, handle.stats(), handle.token_order_summary(), handle.cache_stats()
    finally:
        dit_accel.remove(pipe)


# --- permutations --------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(4, 16, 16), (3, 10, 13)])
def test_permutation_then_inverse_is_identity(grid):
    tile = choose_tile(grid).tile
    perm, inverse = tile_permutation(grid, tile, "cpu")
    n = grid[0] * grid[1] * grid[2]
    assert torch.equal(perm, visual_order(grid, tile)) and torch.equal(torch.sort(perm).values, torch.arange(n))
    x = torch.randn(2, n, 5)
    assert torch.equal(x.index_select(1, perm).index_select(1, inverse), x)
    assert torch.equal(x.index_select(1, inverse).index_select(1, perm), x)

    raster = TokenLayout(grid=grid, patch_size=(1, 2, 2))
    tiled = TokenLayout(grid=grid, patch_size=(1, 2, 2), tile_order=tile)
    # Already in tile order: the identity, and coordinates follow the tokens.
    assert sequence_order(tiled, n, "cpu") is None and sequence_order(raster, n, "cpu") is not None
    assert torch.equal(token_coords(tiled, n, "cpu"), token_coords(raster, n, "cpu").index_select(0, perm))
    # Orders relative to the tile order compose back to the raster-relative ones.
    back = raster_order(tiled, n, "cpu")
    assert raster_order(raster, n, "cpu") is None and torch.equal(perm[back], torch.arange(n))
    other = (1, 8, 16) if grid == (4, 16, 16) else (2, 8, 8)
    assert torch.equal(perm[sequence_order(tiled, n, "cpu", other)], sequence_order(raster, n, "cpu", other))


# --- whole pipeline ------------------------------------------------------------------------------
def test_full_density_forward_equals_stock_and_records_the_path(pipe, stock):
    out, stats, summary, _ = _gen(pipe, dit_accel.get_method("combo", **FULL), "forward")
    assert close(out, stock)
    sparse = [r for r in stats if r["backend"] == "block_sparse"]
    assert sparse and all(r["token_order"] == "forward" for r in sparse)
    # STEPS steps x (cond + uncond) forwards, every one permuted
    assert summary == {"transformer": {"token_order": "forward", "tile": None, "forwards": {"forward": 2 * STEPS}}}
    out_call, stats_call, summary_call, _ = _gen(pipe, dit_accel.get_method("combo", **FULL), "call")
    assert close(out_call, stock) and summary_call == {"transformer": {"token_order": "call"}}
    assert {r["token_order"] for r in stats_call if r["backend"] == "block_sparse"} == {"folded"}


SPARSE = dict(dense_warmup=0.0, dense_first_layers=0, dense_last_step=False, min_seq_len=0, dense_above=None)
SPARSE_METHODS = {
    "combo": dict(top_p=0.6, min_blocks_fraction=0.1, similarity_threshold=-1.0, **SPARSE),
    "permuted": dict(top_p=0.6, min_blocks_fraction=0.1, similarity_threshold=-1.0, **SPARSE),
    "permuted_kmeans": dict(order="kmeans", clusters=4, top_p=0.6, min_blocks_fraction=0.1,
                            similarity_threshold=-1.0, **SPARSE),
    "window": dict(frame_radius=0, space_radius=4, **SPARSE),
    "oracle": dict(top_p=0.6, min_blocks_fraction=0.1, **SPARSE),
}


@pytest.mark.parametrize("name", sorted(SPARSE_METHODS))
def test_forward_equals_call_at_a_sparse_setting(pipe, stock, name):
    method = name.split("_")[0]
    out_f, stats_f, _, _ = _gen(pipe, dit_accel.get_method(method, **SPARSE_METHODS[name]), "forward")
    out_c, stats_c, _, _ = _gen(pipe, dit_accel.get_method(method, **SPARSE_METHODS[name]), "call")
    # the same masks: same densities call by call
    dens_f = [r["density"] for r in stats_f]
    dens_c = [r["density"] for r in stats_c]
    assert dens_f == pytest.approx(dens_c) and max(dens_f) < 0.9
    assert close(out_f, out_c) and not close(out_f, stock, rel=1e-2)  # sparse for real, yet forward == call
    expected = "forward+folded" if name == "permuted_kmeans" else "forward"
    assert {r["token_order"] for r in stats_f if r["backend"] == "block_sparse"} == {expected}


CACHES = {
    # default span = every block: reused steps skip the first and the last block
    "fixed": dict(interval=2, warmup_steps=1, final_steps=0),
    "fixed_output": dict(schedule=[1, 0, 1], warmup_steps=1, final_steps=0, target="output"),
    # selective steps: the deep block recomputed
    "procache": dict(schedule=[1, 2, 0], warmup_steps=1, final_steps=0, selective_blocks=1),
    # ... and 30 % of the tokens through the reused front span. Those calls see a token subset without a grid;
    # a sparse method forms its blocks in the subset's order (tile order under "forward", raster under "call"),
    # so only full density compares the two orders there.
    "procache_tokens": dict(schedule=[1, 2, 0], warmup_steps=1, final_steps=0, selective_blocks=1,
                            selective_tokens=0.3),
}


@pytest.mark.parametrize("name", sorted(CACHES))
def test_caches_compose_with_the_forward_order(pipe, name):
    scheduler = name.split("_")[0]
    options = FULL if name == "procache_tokens" else SPARSE_METHODS["combo"]
    method = dit_accel.get_method("combo", **options)
    cache = make_cache_config(scheduler, **CACHES[name])
    out_f, _, summary, cache_stats = _gen(pipe, method, "forward", cache)
    out_c, _, _, _ = _gen(pipe, method, "call", cache)
    assert any(r["decision"] in ("reuse", "selective") for r in cache_stats)
    assert summary["transformer"]["forwards"] == {"forward": 2 * STEPS}
    assert close(out_f, out_c)


def test_remove_restores_stock_bit_for_bit(pipe, stock):
    blocks = list(pipe.transformer.blocks)
    _gen(pipe, dit_accel.get_method("combo", **SPARSE_METHODS["combo"]), "forward",
         make_cache_config("fixed", interval=2, warmup_steps=1, final_steps=0))
    assert all(not hasattr(b, "_diffusers_hook") and "forward" not in b.__dict__ for b in blocks)
    assert torch.equal(generate(pipe, steps=STEPS), stock)


def test_a_block_hook_installed_after_apply_sees_the_tile_order_too(pipe, stock):
    # the order is applied around the blocks (rotary, patch embedding, output norm), so a cache registered on
    # the blocks after apply composes with it like the one apply installs
    handle = dit_accel.apply(pipe, attention=dit_accel.get_method("combo", **FULL), token_order="forward")
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", interval=1)
    try:
        out = generate(pipe, steps=STEPS)
        assert handle.token_order_summary()["transformer"]["forwards"] == {"forward": 2 * STEPS}
        assert {r["token_order"] for r in handle.stats() if r["backend"] == "block_sparse"} == {"forward"}
        assert close(out, stock)
    finally:
        att.remove()
        dit_accel.remove(pipe)


# --- random-weight Wan transformer (diffusers config), per-token timesteps (Wan 2.2 TI2V) ------------------
@pytest.mark.parametrize("per_token_timestep", [False, True])
def test_tiny_wan_transformer(per_token_timestep):
    case = CASES["wan"]
    model, inputs = case.build(), case.inputs()
    if per_token_timestep:
        tokens = 2 * 10 * 10
        inputs["timestep"] = torch.linspace(100.0, 900.0, tokens).view(1, tokens)  # one timestep per token
    ref = run_model(model, inputs)
    method = dit_accel.get_method("permuted", **FULL)
    for order in ("forward", "call"):
        handle = dit_accel.apply(model, attention=method, token_order=order)
        out = run_model(model, inputs)
        assert handle.token_orders == {"transformer": order} and close(out, ref)
        dit_accel.remove(model)
    assert torch.equal(run_model(model, inputs), ref)


# --- options -----------------------------------------------------------------------------------------
def test_auto_picks_forward_only_where_it_saves_work(pipe):
    for method, expected in (("combo", "forward"), ("window", "forward"), ("draft", "call"), ("dense", "call")):
        handle = dit_accel.apply(pipe, attention=method)
        assert handle.token_orders == {"transformer": expected} and handle.summary()["token_order"] == handle.token_orders
        dit_accel.remove(pipe)
    assert dit_accel.apply(pipe, attention=dit_accel.get_method("oracle", order="none")).token_orders == {"transformer": "call"}
    dit_accel.remove(pipe)


def test_bad_token_order_values_are_rejected_and_change_nothing(pipe):
    processors = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match=r"one of \('auto', 'forward', 'call'\), got 'sometimes'"):
        dit_accel.apply(pipe, attention="combo", token_order="sometimes")
    with pytest.raises(TypeError, match="token_order must be a str"):
        dit_accel.apply(pipe, attention="combo", token_order=True)
    with pytest.raises(ValueError, match="plans in 3D-tile order.*'draft'"):
        dit_accel.apply(pipe, attention="draft", token_order="forward")
    with pytest.raises(ValueError, match="supported for families"):
        dit_accel.apply(CASES["flux"].build(), attention="combo", token_order="forward")
    assert dit_accel.get_handle(pipe) is None and dict(pipe.transformer.attn_processors) == processors
    assert all(not hasattr(b, "_diffusers_hook") for b in pipe.transformer.blocks)
    assert TOKEN_ORDERS == ("auto", "forward", "call") and TOKEN_ORDER_HOOK_NAME == "dit_accel_token_order"


def test_gradient_checkpointing_falls_back_to_the_model_order():
    """Backward recomputes blocks through their hooks after the forward ended; "forward" must step aside
    (reason "grad_checkpointing") so gradients equal the stock model's."""
    from conftest import _wan_inputs, _wan_model

    torch.manual_seed(0)
    model = _wan_model().float()
    model.enable_gradient_checkpointing()
    results = {}
    for order in (None, "forward"):
        x = _wan_inputs()
        x["hidden_states"].requires_grad_(True)
        handle = None if order is None else dit_accel.apply(model, attention=dit_accel.get_method("permuted", **FULL),
                                                            token_order=order)
        out = model(**x, return_dict=False)[0]
        out.square().sum().backward()
        results[order] = (out.detach(), x["hidden_states"].grad.clone())
        if handle is not None:
            forwards = handle.token_order_summary()["transformer"]["forwards"]
            assert set(forwards) == {"grad_checkpointing"}  # the forward and its recomputation in backward
            dit_accel.remove(model)
    assert close(results["forward"][0], results[None][0]) and close(results["forward"][1], results[None][1])
