"""Break-even routing in ``run_plan``: heads planned above the break-even density run dense, the others the
block-sparse kernel, into one output; a call with every head above runs plain dense; the split is kept by reused
plans; ``auto`` on CPU reads the shipped GPU table; the kernel precision and its fallback (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sparse_helpers import call_at, hand_context

import dit_accel
from dit_accel.attention import precision
from dit_accel.attention.base import SparsePlan
from dit_accel.attention.head_split import break_even_of, head_densities
from dit_accel.attention.route import run_plan
from dit_accel.kernels import block_mask_from_bool, block_sparse_attention, block_sparse_attention_reference
from dit_accel.kernels.cost_model import shipped_table

S = 512  # 4 blocks of 128


def _qkv(B=1, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, 64, generator=g) for _ in range(3))


def _mask(B=1):
    """Head 0 every tile (density 1), head 1 half of them (0.5), head 2 the diagonal (0.25)."""
    keep = torch.zeros(B, 3, 4, 4, dtype=torch.bool)
    keep[:, 0] = True
    keep[:, 1, :, :2] = True
    keep[:, 2] = torch.eye(4, dtype=torch.bool)
    return block_mask_from_bool(keep, S, S)


def _run(method, plan, q, k, v, branch="cond", ctx=None):
    ctx = ctx or hand_context(grid=(2, 16, 16))
    call = call_at(ctx, step=3, seq_len=S, batch=q.shape[0], branch=branch)
    out = run_plan(method, call, plan, q, k, v, None)
    return out, call.extra_stats, ctx


def _method(**options):
    return dit_accel.get_method("draft", min_seq_len=0, **options)


def test_heads_above_break_even_run_dense_the_others_the_kernel():
    q, k, v = _qkv()
    mask = _mask()
    out, stats, _ = _run(_method(dense_above=0.6), SparsePlan(mask), q, k, v)
    assert stats["dense_heads"] == (0,) and stats["heads"] == 3 and stats["cost_source"] == "fixed"
    assert stats["break_even"] == 0.6 and stats["backend"] == "block_sparse+cpu_sdpa"
    dense = F.scaled_dot_product_attention(q, k, v)
    sparse = block_sparse_attention(q, k, v, mask)
    # each head equals what the all-dense / all-sparse call gives on it
    assert torch.equal(out[:, 0], dense[:, 0])
    assert torch.allclose(out[:, 1:], sparse[:, 1:], atol=1e-6)
    assert stats["density"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert stats["planned_density"] == pytest.approx((1.0 + 0.5 + 0.25) / 3)


def test_per_batch_row_split_with_a_per_row_mask():
    q, k, v = _qkv(B=2)
    keep = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    keep[1, :, :, 2:] = False  # row 1: every head at 0.5
    mask = block_mask_from_bool(keep, S, S)
    out, stats, _ = _run(_method(dense_above=0.75), SparsePlan(mask), q, k, v)
    assert stats["dense_heads"] == (0, 1, 2)  # row 0's heads, flat b * H + h
    assert torch.equal(out[0], F.scaled_dot_product_attention(q, k, v)[0])
    assert torch.allclose(out[1], block_sparse_attention(q, k, v, mask)[1], atol=1e-6)


def test_no_head_below_break_even_runs_plain_dense():
    q, k, v = _qkv()
    out, stats, _ = _run(_method(dense_above=0.2), SparsePlan(_mask()), q, k, v)
    assert stats["dense_reason"] == "break_even" and stats["backend"] == "cpu_sdpa"
    assert stats["dense_heads"] == (0, 1, 2) and stats["density"] == 1.0
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_never_dense_runs_every_head_on_the_kernel():
    q, k, v = _qkv()
    mask = _mask()
    out, stats, _ = _run(_method(dense_above=None), SparsePlan(mask), q, k, v)
    assert "dense_heads" not in stats and "backend" not in stats
    assert torch.equal(out, block_sparse_attention(q, k, v, mask))


def test_a_reused_plan_keeps_the_split_of_its_fresh_plan():
    q, k, v = _qkv()
    method = _method(dense_above=0.6)
    _, first, ctx = _run(method, SparsePlan(_mask()), q, k, v)
    everything = block_mask_from_bool(torch.ones(1, 3, 4, 4, dtype=torch.bool), S, S)
    out, reused, _ = _run(method, SparsePlan(everything, fresh=False), q, k, v, ctx=ctx)
    assert reused["dense_heads"] == first["dense_heads"] == (0,)
    assert torch.allclose(out[:, 1:], F.scaled_dot_product_attention(q, k, v)[:, 1:], atol=1e-5)
    _, fresh, _ = _run(method, SparsePlan(everything), q, k, v, ctx=ctx)
    assert fresh["dense_reason"] == "break_even"  # a fresh plan chooses again
    _, other, _ = _run(method, SparsePlan(_mask(), fresh=False), q, k, v, branch="uncond", ctx=ctx)
    assert other["dense_heads"] == (0,)  # another branch has no stored split: it chooses


def test_auto_on_cpu_reads_the_shipped_gpu_table():
    be, source = break_even_of("auto", torch.device("cpu"), 16384, 64, "bf16")
    assert source == "shipped" and be == shipped_table().break_even_density(16384, 64, "bf16")
    assert 0.0 < be < 1.0
    assert break_even_of(0.3, torch.device("cpu"), 16384, 64, "bf16") == (0.3, "fixed")
    q, k, v = _qkv()
    _, stats, _ = _run(_method(), SparsePlan(_mask()), q, k, v)
    expect = shipped_table().break_even_density(S, 64, "bf16")
    assert stats["break_even"] == expect and stats["cost_source"] == "shipped"
    assert stats["dense_heads"] == tuple(i for i, d in enumerate((1.0, 0.5, 0.25)) if d > expect)


def test_head_densities_broadcast():
    mask = _mask()
    assert head_densities(mask, 2, 3).tolist() == [[1.0, 0.5, 0.25]] * 2


def test_dense_above_is_validated():
    for bad in ("fast", 1.5, -0.1, True):
        with pytest.raises(ValueError, match="dense_above must be 'auto', None or a float"):
            _method(dense_above=bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        _method(precision="fp16")


def test_fp8_through_a_method_on_cpu_gives_the_fp8_reference_numbers():
    q, k, v = _qkv()
    mask = _mask()
    out, stats, _ = _run(_method(dense_above=None, precision="fp8"), SparsePlan(mask), q, k, v)
    assert stats["precision"] == "fp8" and "precision_fallback" not in stats
    assert torch.equal(out, block_sparse_attention_reference(q, k, v, mask, precision="fp8"))
    assert not torch.equal(out, block_sparse_attention(q, k, v, mask))


def test_fp8_without_an_8bit_kernel_falls_back_to_bf16_and_says_why(monkeypatch):
    monkeypatch.setattr(precision, "fp8_support_of", lambda q: (False, "GPU compute capability (8, 0) has no FP8"))
    monkeypatch.setattr(precision, "_PRECISION", {})
    q, k, v = _qkv()
    mask = _mask()
    out, stats, _ = _run(_method(dense_above=0.6, precision="fp8"), SparsePlan(mask), q, k, v)
    assert stats["precision"] == "bf16" and "no FP8" in stats["precision_fallback"]
    assert torch.allclose(out[:, 1:], block_sparse_attention(q, k, v, mask)[:, 1:], atol=1e-6)


def test_apply_sets_the_precision_of_the_method_and_refuses_it_without_a_kernel():
    from sparse_helpers import tiny_testbed

    pipe = tiny_testbed(num_layers=1)
    handle = dit_accel.apply(pipe, preset="balanced", precision="fp8")
    assert handle.method.precision == "fp8" and handle.method.cfg.top_p is None
    assert handle.summary()["attention_config"]["precision"] == "fp8"
    dit_accel.remove(pipe)
    assert dit_accel.apply(pipe, attention="draft").method.precision == "bf16"
    dit_accel.remove(pipe)
    with pytest.raises(ValueError, match="precision 'fp8' applies to the sparse attention methods"):
        dit_accel.apply(pipe, preset="dense", precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        dit_accel.apply(pipe, attention="draft", precision="int4")
    assert dit_accel.get_handle(pipe) is None


def test_dense_backend_per_shape():
    from dit_accel.attention.dense import PROBED_MIN_KEYS, dense_call_backend, prefers_probed_order

    long = torch.empty(1, 2, PROBED_MIN_KEYS, 64)
    short = torch.empty(1, 2, PROBED_MIN_KEYS - 1, 64)
    text = torch.empty(1, 2, 32, 64)
    assert prefers_probed_order(long, long, None)
    assert not prefers_probed_order(short, short, None)  # no measurement below: torch's own dispatch
    assert not prefers_probed_order(long, text, None)  # cross-attention over text tokens
    assert not prefers_probed_order(long, long, torch.ones(1, 1, 1, PROBED_MIN_KEYS, dtype=torch.bool))
    assert dense_call_backend(long, long) == "cpu_sdpa"


def test_dense_method_skips_planning():
    from dit_accel.attention.exact import DenseMethod

    assert DenseMethod.plans is False and dit_accel.get_method("draft").plans is True


def test_a_preset_run_records_the_split_and_its_reason():
    from sparse_helpers import generate, tiny_testbed

    pipe = tiny_testbed(num_layers=2)
    handle = dit_accel.apply(pipe, preset="quality")
    generate(pipe, steps=3)
    planned = [r for r in handle.stats() if "heads" in r]
    summary = handle.stats_summary()
    dit_accel.remove(pipe)
    assert planned and all(r["cost_source"] == "shipped" and 0 < r["break_even"] < 1 for r in planned)
    assert all(len(r["dense_heads"]) <= r["heads"] == 2 for r in planned)
    share = sum(len(r["dense_heads"]) for r in planned) / sum(r["heads"] for r in planned)
    assert summary["dense_head_share"] == pytest.approx(share)
    for r in planned:
        if r["dense_reason"] == "break_even":
            assert len(r["dense_heads"]) == r["heads"] and r["density"] == 1.0


def test_the_route_looks_the_kernel_up_at_call_time(monkeypatch):
    """Peers (the bench's FlexAttention run) replace ``dit_accel.kernels.block_sparse_attention``: run_plan must
    find the replacement."""
    import dit_accel.kernels as kernels

    calls = []
    original = kernels.block_sparse_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("head_index"))
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "block_sparse_attention", counting)
    q, k, v = _qkv()
    _run(_method(dense_above=None), SparsePlan(_mask()), q, k, v)
    _run(_method(dense_above=0.6), SparsePlan(_mask()), q, k, v)
    assert len(calls) == 2 and calls[0] is None and calls[1].tolist() == [1, 2]
