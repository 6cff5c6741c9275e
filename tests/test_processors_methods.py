"""Method contract: registry, SparsePlan permutations and tile statistics reach the method."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_CASES, run_model

import dit_accel
from dit_accel.attention.base import AttentionMethod, SparsePlan
from dit_accel.context import State
from dit_accel.kernels import block_mask_from_bool, dense_block_mask


class ReversedFullMethod(AttentionMethod):
    """Full mask over the reversed token order: the permutation must be undone exactly."""

    name = "test_reversed"

    def plan(self, q, k, ctx):
        seq = q.shape[-2]
        return SparsePlan(dense_block_mask(1, 1, seq, seq, device=q.device), torch.arange(seq - 1, -1, -1))


@dataclass
class _TileStats(State):
    """The tile statistics of the last call of one (layer, branch)."""

    tile_stats: torch.Tensor | None = None


class DiagonalWithStatsMethod(AttentionMethod):
    """Block-diagonal mask (so the output really differs from dense) that keeps the kernel's tile stats."""

    name = "test_diagonal"
    needs_tile_stats = True

    def plan(self, q, k, ctx):
        n = -(-q.shape[-2] // 128)
        keep = torch.eye(n, dtype=torch.bool)[None, None]
        return block_mask_from_bool(keep, q.shape[-2], k.shape[-2])

    def observe(self, ctx, tile_stats):
        for branch in set(ctx.branches):
            ctx.state(branch, _TileStats).tile_stats = tile_stats


def test_registry_lists_dense_and_full():
    assert {"dense", "full"} <= set(dit_accel.available_methods())
    assert dit_accel.get_method("full", min_seq_len=7).config() == {"min_seq_len": 7}
    method = dit_accel.get_method("dense")
    assert dit_accel.get_method(method) is method
    with pytest.raises(ValueError, match="given together with a method instance"):
        dit_accel.get_method(method, min_seq_len=1)


def test_register_method_rejects_bad_classes():
    with pytest.raises(TypeError, match="expects an AttentionMethod subclass"):
        dit_accel.register_method(int)

    class Nameless(AttentionMethod):
        pass

    with pytest.raises(ValueError, match="must set a non-empty class attribute `name`"):
        dit_accel.register_method(Nameless)

    class Impostor(AttentionMethod):
        name = "full"

    with pytest.raises(ValueError, match="'full' is already registered by FullMethod"):
        dit_accel.register_method(Impostor)


@pytest.mark.parametrize("case_name", ["wan", "flux"])
def test_sparse_plan_permutation_is_undone(case_name):
    case = TINY_CASES[case_name]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)
    handle = dit_accel.apply(model, attention=ReversedFullMethod(min_seq_len=0))
    assert (run_model(model, inputs) - reference).abs().max().item() <= 1e-5
    assert {s["backend"] for s in handle.stats()} == {"block_sparse"}
    dit_accel.remove(model)


def test_tile_stats_reach_the_method_and_sparsity_changes_output():
    case = TINY_CASES["wan"]
    model, inputs = case.build(), case.inputs()
    reference = run_model(model, inputs)
    handle = dit_accel.apply(model, attention=DiagonalWithStatsMethod(min_seq_len=0))
    out = run_model(model, inputs)
    assert (out - reference).abs().max().item() > 1e-3  # two of four tiles skipped: not dense any more
    state = handle.contexts["transformer"].method_state(0, "cond", _TileStats)
    stats = state.tile_stats
    assert stats.shape == (1, 2, 2, 2)  # B, H, 200 tokens -> 2 query blocks x 2 key blocks
    assert torch.isinf(stats[..., 0, 1]).all() and torch.isfinite(stats[..., 0, 0]).all()
    assert {s["density"] for s in handle.stats()} == {0.5}
    dit_accel.remove(model)
