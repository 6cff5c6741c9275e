"""`dit-accel bench`: the tiny CPU flow end to end (the JSON's structure and sanity), the peers' tuning replays,
FlexAttention with our masks against our kernel, the budget, the dry-run plan and the testbed-quality suite."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from dit_accel.bench import peers as P
from dit_accel.bench import runs as RS
from dit_accel.bench.models import SPECS, TINY_SPECS, describe, resolve_layers
from dit_accel.bench.runner import Budget, BenchOptions, run_bench

REQUIRED_RUN_FIELDS = ("speedup_vs_stock", "speedup_vs_stock_cudnn", "seconds", "seconds_cold", "seconds_per_step",
                       "peak_gib", "mean_density", "cache_compute_fraction", "plan_ms", "breakdown")
REQUIRED_RUNS = ("stock", "stock_cudnn", "dense", "quality", "balanced", "fast", "turbo", "balanced.attention",
                 "balanced.cache", "fast.attention", "fast.cache", "turbo.attention", "turbo.cache", "quality.attention",
                 "fbc", "magcache", "flex.balanced")


def _finite_numbers(value, path="") -> None:
    if isinstance(value, float):
        assert math.isfinite(value), path
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    run_bench(BenchOptions(out=out, tiny=True, device="cpu", time_budget_s=900, argv=["dit-accel", "bench", "--tiny"]),
              print_fn=lambda _: None)
    return json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-finite {c} in JSON")), out


def test_tiny_bench_json_structure_and_sanity(tiny_report) -> None:
    report, out = tiny_report
    assert report["schema"] == "dit-accel-bench/1" and report["device_type"] == "cpu"
    assert report["clock"] == "host_perf_counter" and report["argv"] == ["dit-accel", "bench", "--tiny"]
    assert report["versions"]["torch"] == torch.__version__ and report["date"]
    assert list(report["models"]) == list(TINY_SPECS)  # all eight families, in order
    _finite_numbers(report)
    for name, model in report["models"].items():
        assert model["shape"]["tokens"] == TINY_SPECS[name].tokens and model["shape"]["steps"] == 4
        assert model["layers"]["used"] and model["layers"]["full"]
        runs = model["runs"]
        for key in REQUIRED_RUNS:
            assert key in runs, (name, key)
        assert runs["stock"]["speedup_vs_stock"] == pytest.approx(1.0)
        # a run identical to an earlier one is recorded as the same, not run again
        assert runs["dense.attention"]["same_as"] == "dense"
        assert runs["sage"]["skipped"] == "needs CUDA"
        for key, run in runs.items():
            if "error" in run or "skipped" in run:
                assert key not in ("stock", "stock_cudnn", "dense", "quality", "balanced", "balanced.cache"), (name, key, run)
                continue
            for field in REQUIRED_RUN_FIELDS:
                assert field in run, (name, key, field)
            assert run["speedup_vs_stock"] > 0 and run["seconds"] > 0 and run["seconds_cold"] > 0, (name, key)
            assert run["peak_gib"] is None  # CPU: no CUDA allocator
            if run["mean_density"] is not None:
                assert 0.0 <= run["mean_density"] <= 1.0
            assert 0.0 < run["cache_compute_fraction"] <= 1.0, (name, key)
            assert run["finite_output"] is True
            if run.get("kind") in ("preset", "attention_part") and run["preset"] != "dense":
                assert run["plan_ms"] is not None and run["plan_ms"] >= 0 and run["plan_calls"] > 0, (name, key)
                # the method planned: its calls ran the block-sparse kernel or were routed dense by break-even
                stats = run["attention_stats"]
                assert stats["sparse_calls"] + stats["dense_reasons"].get("break_even", 0) > 0, (name, key)
        assert runs["balanced.cache"]["cache_compute_fraction"] < 1.0
        assert model["target_fraction"] == runs["balanced.cache"]["cache_compute_fraction"]
        # MagCache's skip rule depends only on its ratios: the replay predicts the measured share exactly
        mag = runs["magcache"]
        assert mag["cache_compute_fraction"] == pytest.approx(mag["params"]["replayed_step_share"])
        # FlexAttention ran every call that took the kernel path (break-even routing may send a tiny model's heads
        # dense; test_route_break_even checks that the route looks the kernel up where the peer replaces it)
        flex = runs["flex.balanced"]
        assert flex["counters"]["flex_calls"] >= flex["attention_stats"]["sparse_calls"]
        stock = runs["stock"]["breakdown"]
        assert stock["attention_s"] > 0 and stock["rest_s"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000


def test_tiny_bench_reduced_depth_scales_the_first_layer_valve(tiny_report) -> None:
    runs = tiny_report[0]["models"]["wan2.1-14b-720p"]["runs"]  # tiny twin built with 2 of its 3 blocks
    assert tiny_report[0]["models"]["wan2.1-14b-720p"]["layers"] ["used"] == {"num_layers": 2}
    assert "dense_first_layers" not in runs["balanced"].get("params", {})  # round(1 x 2/3) = 1: unchanged


def test_depth_scaled_method() -> None:
    ctx = RS.ModelContext(pipe=None, spec=SPECS["wan2.1-1.3b-480p"], steps=8, call_kwargs={}, device=torch.device("cpu"),
                          peer_preset="balanced", built_layers=2, full_layers=30)
    method = RS.depth_scaled_method(ctx, "balanced", "combo", {"quality": "balanced"})
    assert method.config()["dense_first_layers"] == 0 and "1 -> 0" in ctx.notes["balanced"]["dense_first_layers"]
    full = RS.ModelContext(pipe=None, spec=SPECS["wan2.1-1.3b-480p"], steps=8, call_kwargs={}, device=torch.device("cpu"),
                           peer_preset="balanced", built_layers=30, full_layers=30, min_seq_len=0)
    method = RS.depth_scaled_method(full, "balanced", "combo", {"quality": "balanced"})
    assert method.config()["dense_first_layers"] == 1 and method.config()["min_seq_len"] == 0
    assert RS.depth_scaled_method(ctx, "dense", "dense", {}).name == "dense"  # no valve: unchanged


def test_first_block_replay() -> None:
    # changes against every earlier step: step 2 drifts little from 1, step 3 much
    diffs = [[], [0.5], [0.6, 0.05], [0.9, 0.4, 0.3]]
    assert P.first_block_share(diffs, 0.0) == 1.0
    assert P.first_block_share(diffs, 0.1) == 0.75  # 0, 1, 3 (step 2 is 0.05 from step 1)
    assert P.first_block_share(diffs, 0.45) == 0.5  # 0, 1 computed; 3 is 0.4 from step 1: reused
    threshold, share = P.fit_first_block_threshold([diffs], 0.5)
    assert share == 0.5 and P.first_block_share(diffs, threshold) == 0.5


def test_magcache_and_taylorseer_replays() -> None:
    ratios = [1.0, 1.0, 0.99, 0.98, 0.97, 0.95, 0.9, 0.8]
    assert P.magcache_share(ratios, 0.0, 0.25, 3) == 1.0
    assert P.magcache_share(ratios, 10.0, 0.25, 3) == pytest.approx(3 / 8)  # warm-up 0-1, skip 2-4, 5, skip 6-7
    threshold, share = P.fit_magcache_threshold(ratios, 0.75, 0.25, 3)
    assert share == P.magcache_share(ratios, threshold, 0.25, 3) and abs(share - 0.75) <= 0.125
    # diffusers' TaylorSeer: steps < warm-up, then every interval-th step after the first cached one
    assert P.taylorseer_share(8, 1, 2) == 1.0
    assert P.taylorseer_share(8, 2, 2) == pytest.approx(5 / 8)  # 0, 1, 3, 5, 7
    assert P.fit_taylorseer_interval(8, 0.5, 2) == (3, 0.5)


def test_flex_block_mask_keeps_the_tiles() -> None:
    """The FlexAttention form of our mask lists the same tiles; ragged edge tiles stay partial, the rest are full."""
    from dit_accel.kernels import block_mask_from_bool

    g = torch.Generator().manual_seed(1)
    for S in (256, 300):
        n = -(-S // 128)
        blocks = torch.rand(2, 3, n, n, generator=g) > 0.5
        converted = P.flex_block_mask(block_mask_from_bool(blocks, S, S))
        full = converted.full_kv_num_blocks
        assert converted.seq_lengths == (S, S)
        assert torch.equal(converted.kv_num_blocks + full, blocks.sum(-1).to(full.dtype))
        dense = torch.zeros_like(blocks)
        for b in range(2):
            for h in range(3):
                for qb in range(n):
                    for num, idx in ((converted.kv_num_blocks, converted.kv_indices),
                                     (full, converted.full_kv_indices)):
                        dense[b, h, qb, idx[b, h, qb, : num[b, h, qb]].long()] = True
                    if S % 128 == 0:
                        assert converted.kv_num_blocks[b, h, qb] == 0  # nothing ragged: every tile full
        assert torch.equal(dense, blocks)
        if S % 128:
            assert torch.equal(converted.kv_num_blocks[..., -1], blocks[..., -1, :].sum(-1).to(full.dtype))


def test_flex_kernel_matches_our_kernel() -> None:
    """FlexAttention running our BlockMask (with a token permutation, ragged length) gives our kernel's output."""
    from dit_accel.kernels import block_mask_from_bool, block_sparse_attention

    g = torch.Generator().manual_seed(0)
    B, H, S, D = 1, 2, 300, 64
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    blocks = torch.rand(B, H, 3, 3, generator=g) > 0.4
    blocks[..., 0] = True  # every query block sees at least one key block
    mask = block_mask_from_bool(blocks, S, S)
    perm = torch.randperm(S, generator=g).to(torch.int32)
    ours = block_sparse_attention(q, k, v, mask, q_index=perm, kv_index=perm)
    flex = P.FlexKernel(reference=block_sparse_attention)
    theirs = flex(q, k, v, mask, q_index=perm, kv_index=perm)
    assert flex.calls == 1 and len(flex.check_errors) <= 1 and max(flex.check_errors, default=0.0) < 1e-4
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flex(q, k, v, mask), block_sparse_attention(q, k, v, mask), atol=1e-4, rtol=1e-4)
    with pytest.raises(NotImplementedError, match="tile statistics"):
        flex(q, k, v, mask, tile_stats=True)


def test_runs_dedupe_and_order() -> None:
    runs = RS.plan_runs()
    keys = [r.key for r in runs]
    assert keys[:2] == ["stock", "stock_cudnn"] and keys.index("balanced.cache") < keys.index("fbc")
    same = RS.dedupe(runs)
    # only the dense preset's attention part equals a run of its own: every other preset has its own cache schedule
    assert same == {"dense.attention": "dense"}
    fp8_parts = [f"{n}.attention.fp8" for n in ("quality", "balanced", "fast", "turbo")]
    assert sorted(r.key for r in runs if not r.required) == sorted(fp8_parts + ["taylorseer", "dbcache", "sage"])
    assert all(dict(r.signature[1][1])["precision"] == "fp8" for r in runs if r.key in fp8_parts)
    with pytest.raises(ValueError, match="peer preset 'dense' has no cache"):
        RS.plan_runs(peer_preset="dense")
    with pytest.raises(ValueError, match="unknown flex preset 'nope'"):
        RS.plan_runs(flex_preset="nope")


def test_budget_admission() -> None:
    now = [0.0]
    budget = Budget(100.0, now=lambda: now[0])
    share = budget.begin_model(need=30.0, needs_left=90.0)
    assert share == pytest.approx((100.0 - 10.0) / 3)  # 10 s reserve, this model needs a third
    assert budget.admit(cold_s=10.0, timed_s=10.0)
    now[0] += 10.0
    assert not budget.admit(cold_s=6.0, timed_s=6.0)  # 10 elapsed + 10 promised + 12 would pass the share of 30
    budget.release(10.0)
    now[0] += 10.0
    assert budget.admit(cold_s=4.0, timed_s=4.0)


def test_tiny_bench_without_budget_records_skips(tmp_path: Path) -> None:
    """A budget that holds nothing (10 s, all of it the final reserve) skips every run with the reason."""
    out = tmp_path / "b.json"
    report = run_bench(BenchOptions(out=out, tiny=True, device="cpu", models=("flux.1-dev-1024",), time_budget_s=10.0,
                                    runs=("stock", "balanced*")), print_fn=lambda _: None)
    model = report["models"]["flux.1-dev-1024"]
    assert model["skipped"] == "budget"
    assert set(model["runs"]) == {"stock", "balanced", "balanced.cache", "balanced.attention", "balanced.attention.fp8"}
    assert all(r["skipped"] == "budget" for r in model["runs"].values())
    assert json.loads(out.read_text())["models"]["flux.1-dev-1024"]["runs"].keys() == model["runs"].keys()


def test_compiled_variant_records_dynamo_counters(tmp_path: Path) -> None:
    report = run_bench(BenchOptions(out=tmp_path / "c.json", tiny=True, device="cpu", models=("wan2.1-1.3b-480p",),
                                    runs=("stock",), compile=True, time_budget_s=600), print_fn=lambda _: None)
    run = report["models"]["wan2.1-1.3b-480p"]["runs"]["stock+compile"]
    assert run["compiled"] is True and run["params"]["backend"] == "eager"
    assert run["dynamo"]["graph_breaks"] == 0 and run["dynamo"]["frames_compiled"] >= 1
    assert run["speedup_vs_stock_compiled"] == pytest.approx(1.0) and run["breakdown"] is None


def test_dry_run_plans_every_model_within_the_budget() -> None:
    from dit_accel.bench.cli import dry_run

    lines: list[str] = []
    plan = dry_run(BenchOptions(out=Path("unused.json")), print_fn=lines.append)
    assert list(plan["models"]) == list(SPECS)
    assert plan["estimated_total_s"] <= plan["time_budget_s"]
    for name, model in plan["models"].items():
        assert "stock" in model["admitted"] and model["est_forward_ms"] > 0
    one = describe(SPECS["wan2.1-1.3b-480p"], resolve_layers(SPECS["wan2.1-1.3b-480p"], 30), 8)
    assert 450 < one["est_forward_ms"] < 800  # measured 611 ms on the H200
    assert resolve_layers(SPECS["flux.1-dev-1024"], 6) == (2, 4)
    with pytest.raises(ValueError, match="at least 2"):
        resolve_layers(SPECS["flux.1-dev-1024"], 1)


def test_cli_bench_wiring(tmp_path: Path, capsys) -> None:
    from dit_accel.cli import main

    assert main(["bench", "--dry-run", "--models", "sd3.5-large-1024"]) == 0
    assert "sd3.5-large-1024" in capsys.readouterr().out
    assert main(["bench", "--dry-run", "--runs", "nope*"]) == 2
    assert "matches no configuration" in capsys.readouterr().err
    assert main(["bench", "--dry-run", "--models", "nope"]) == 2


def test_testbed_quality_tiny(tmp_path: Path) -> None:
    from dit_accel.bench.testbed import run_testbed_quality

    out = tmp_path / "presets_testbed.json"
    data = run_testbed_quality(out, device=torch.device("cpu"), tiny=True, num_prompts=1, height=32, width=32, frames=4,
                               steps=4, print_fn=lambda _: None)
    assert json.loads(out.read_text()) == json.loads(json.dumps(data))
    assert data["stock"]["seconds_mean"] > 0 and "FID/KID omitted" in data["distribution_metrics"]
    assert set(data["presets"]) == {"dense", "quality", "balanced", "fast", "turbo"}
    for name, p in data["presets"].items():
        assert p["speedup_vs_stock"] > 0 and 0 <= p["ssim"] <= 1 and p["psnr"] > 0 and p["feature_distance"] >= 0, name
        assert 0 <= p["mean_density"] <= 1
    assert data["presets"]["dense"]["psnr"] == 100.0  # our dense route reproduces the stock pipeline
    assert data["presets"]["balanced"]["cache_compute_fraction"] < 1.0
    # the generated docs read this file as written
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import make_docs

    doc = make_docs.render_presets_testbed({"presets_testbed.json": data})
    assert "random-weight tiny testbed" in doc
    for p in data["presets"].values():
        assert f"| {p['tag']} | {p['speedup_vs_stock']:.2f}x | {p['psnr']:.1f} dB | {p['ssim']:.3f} |" in doc
