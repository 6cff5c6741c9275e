"""The device cost model of block-sparse attention (CPU): interpolation, break-even, the disk cache and its
invalidation, the shipped fallback table, the CPU answer, bad input."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from dit_accel.kernels import cost_model as cm
from dit_accel.kernels.cost_model import CostCurve, CostTable


def _curve() -> CostCurve:
    # At 4096 tokens the kernel is never faster; at 65536 it is faster up to density 0.75.
    return CostCurve(
        seq_lens=(4096, 65536),
        densities=(0.25, 0.5, 1.0),
        ratios=((1.2, 1.5, 2.0), (0.25, 0.5, 1.25)),
    )


def _table(**curves) -> CostTable:
    return CostTable("Test GPU", "2.0", "3.0", cm.KERNEL_VERSION, "measured",
                     curves or {("bf16", 128): _curve()}, {"note": "test"})


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cm.CACHE_ENV, str(tmp_path))
    return tmp_path


# -------------------------------------------------------------------------------- interpolation
def test_ratio_interpolates_in_density_and_log_seq_len():
    c = _curve()
    assert c.ratio(65536, 0.5) == pytest.approx(0.5)
    assert c.ratio(65536, 0.75) == pytest.approx(0.875)  # halfway between 0.5 and 1.25
    assert c.ratio(65536, 1.0) == pytest.approx(1.25)
    # 16384 = 2^14 is halfway between 2^12 and 2^16 in log(seq_len).
    assert c.ratio(16384, 0.5) == pytest.approx((1.5 + 0.5) / 2)
    # Outside the grid: clamped to the nearest length.
    assert c.ratio(1024, 0.5) == pytest.approx(1.5) and c.ratio(10**6, 0.5) == pytest.approx(0.5)
    # Below the smallest density: the first segment extrapolated toward 0, never negative or above ratio(d0).
    assert c.ratio(65536, 0.125) == pytest.approx(0.125)
    assert c.ratio(65536, 0.0) == pytest.approx(0.0)
    assert c.ratio(4096, 0.0) == pytest.approx(0.9)


def test_break_even_is_the_largest_density_still_faster():
    c = _curve()
    assert c.break_even(65536) == pytest.approx(0.5 + 0.5 * 0.5 / 0.75)  # 0.5 -> 0.5, 1.0 -> 1.25 crosses at 0.8333
    assert c.break_even(4096) == pytest.approx(0.25 * 0.1 / 0.3)  # the extrapolated line 0.9 + 1.2 d crosses 1 at 1/12
    always = CostCurve((4096,), (0.5, 1.0), ((0.4, 0.8),))
    assert always.break_even(4096) == 1.0
    never = CostCurve((4096,), (0.5, 1.0), ((1.5, 2.0),))
    assert never.break_even(4096) == 0.0
    # Not monotone: the largest crossing wins.
    bumpy = CostCurve((4096,), (0.25, 0.5, 0.75, 1.0), ((0.5, 1.1, 0.9, 1.3),))
    assert bumpy.break_even(4096) == pytest.approx(0.75 + 0.25 * 0.1 / 0.4)


def test_table_lookups_pad_head_dims_and_fall_back_to_bf16_for_fp8():
    t = _table()
    assert t.relative_cost(65536, 72, 0.5, "bf16") == pytest.approx(0.5)  # 72 runs as 128
    assert t.relative_cost(65536, 128, 0.5, "fp8") == pytest.approx(0.5)  # no fp8 curve: the bf16 one
    assert math.isinf(t.relative_cost(65536, 64, 0.5))  # no curve for 64: never faster
    assert t.break_even_density(65536, 64) == 0.0
    fast = CostTable("Test GPU", "2.0", "3.0", cm.KERNEL_VERSION, "measured",
                     {("bf16", 128): _curve(), ("fp8", 128): CostCurve((4096,), (0.5, 1.0), ((0.3, 0.6),))})
    assert fast.break_even_density(4096, 128, "fp8") == 1.0
    assert fast.break_even_density(4096, 128, "bf16") < 0.1


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 128, 0.5, "bf16"), "seq_len"),
        ((4096.0, 128, 0.5, "bf16"), "seq_len"),
        ((4096, 96, 0.5, "bf16"), "head_dim"),
        ((4096, 128, 1.5, "bf16"), "density"),
        ((4096, 128, -0.1, "bf16"), "density"),
        ((4096, 128, 0.5, "int4"), "precision"),
    ],
)
def test_bad_queries_raise(args, match):
    with pytest.raises(ValueError, match=match):
        _table().relative_cost(*args)


def test_bad_curves_raise():
    with pytest.raises(ValueError, match="ascending"):
        CostCurve((4096, 1024), (0.5, 1.0), ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="densities"):
        CostCurve((4096,), (0.0, 1.0), ((1, 1),))
    with pytest.raises(ValueError, match="ratios must be"):
        CostCurve((4096,), (0.5, 1.0), ((1, 1, 1),))
    with pytest.raises(ValueError, match="positive and finite"):
        CostCurve((4096,), (0.5, 1.0), ((1, float("inf")),))


# -------------------------------------------------------------------------------------- cache
def test_cache_roundtrip_and_invalidation_on_any_version(cache_dir):
    t = _table()
    path = cm.save_cached_table(t)
    assert path.parent == cache_dir / "cost_model" and path.exists()
    got = cm.load_cached_table("Test GPU", "2.0", "3.0")
    assert got is not None and got.source == "cache" and got.curves == t.curves and got.meta == t.meta
    # Another torch, Triton, kernel version or device: another file, so the stale table is never read.
    assert cm.load_cached_table("Test GPU", "2.1", "3.0") is None
    assert cm.load_cached_table("Test GPU", "2.0", "3.1") is None
    assert cm.load_cached_table("Test GPU", "2.0", "3.0", kernel_version=cm.KERNEL_VERSION + "x") is None
    assert cm.load_cached_table("Other GPU", "2.0", "3.0") is None
    # A corrupt file is ignored, not an error.
    path.write_text("{not json")
    assert cm.load_cached_table("Test GPU", "2.0", "3.0") is None


def test_resolve_prefers_cache_then_measures_and_caches(cache_dir):
    calls = []

    def measure() -> CostTable:
        calls.append(1)
        return _table()

    got = cm.resolve_table("Test GPU", allow_measure=True, measure=measure, versions=("2.0", "3.0"))
    assert got.source == "measured" and calls == [1]
    got = cm.resolve_table("Test GPU", allow_measure=True, measure=measure, versions=("2.0", "3.0"))
    assert got.source == "cache" and calls == [1]  # measured once, then read from disk
    # A new torch version invalidates: measured again.
    cm.resolve_table("Test GPU", allow_measure=True, measure=measure, versions=("2.1", "3.0"))
    assert calls == [1, 1]


def test_resolve_falls_back_to_the_shipped_table(cache_dir):
    def broken() -> CostTable:
        raise RuntimeError("no GPU time")

    with pytest.warns(RuntimeWarning, match="no GPU time"):
        got = cm.resolve_table("Test GPU", allow_measure=True, measure=broken, versions=("2.0", "3.0"))
    assert got.source == "shipped"
    assert not list(cache_dir.rglob("*.json"))  # a failed measurement caches nothing
    got = cm.resolve_table("Test GPU", allow_measure=False, measure=broken, versions=("2.0", "3.0"))
    assert got.source == "shipped"


def test_shipped_table_is_valid_and_sensible():
    t = cm.shipped_table()
    assert t.source == "shipped" and t.kernel_version == cm.KERNEL_VERSION
    for D in (64, 128):
        c = t.curves[("bf16", D)]
        # Full density costs more than dense attention; a tenth of the blocks costs much less at long sequences.
        assert c.ratio(c.seq_lens[-1], 1.0) > 0.9 and c.ratio(c.seq_lens[-1], 0.1) < 0.3
        assert 0.0 < t.break_even_density(32760, D) < 1.0
    json.dumps(t.to_json())


# ------------------------------------------------------------------------------------ devices
def test_cpu_is_always_dense():
    assert cm.break_even_density("cpu", 32760, 128) == 0.0
    assert cm.break_even_density(torch.device("cpu"), 4096, 64, "fp8") == 0.0
    assert math.isinf(cm.relative_cost("cpu", 32760, 128, 0.1))
    assert cm.cost_table("cpu").source == "cpu"


def test_cost_model_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv(cm.COST_MODEL_ENV, raising=False)
    assert cm.cost_model_mode() == "measure"
    monkeypatch.setenv(cm.COST_MODEL_ENV, "shipped")
    assert cm.cost_model_mode() == "shipped"
    monkeypatch.setenv(cm.COST_MODEL_ENV, "sometimes")
    with pytest.raises(ValueError, match="'measure' or 'shipped'"):
        cm.cost_model_mode()


def test_measuring_loop_produces_a_table_of_the_grid():
    # The loop of measure_cost_table, on CPU with a wall-clock timer (the kernel is the torch reference here,
    # so the ratios are large; what is checked is the table's shape and heads).
    def timer(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3 + 1e-6

    curves, heads = cm._measure_curves(torch.device("cpu"), seq_lens=(256, 384), densities=(0.5, 1.0),
                                       head_dims=(64,), precisions=("bf16", "fp8"), num_sms=2, timer=timer)
    # fp8 is not supported on CPU without the interpreter: only bf16 is measured.
    assert set(curves) == {("bf16", 64)}
    c = curves[("bf16", 64)]
    assert c.seq_lens == (256, 384) and c.densities == (0.5, 1.0) and all(x > 0 for r in c.ratios for x in r)
    assert heads == {256: 8, 384: 6}
