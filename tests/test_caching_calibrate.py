"""Schedule search (``calibrate``), schedule files, the ``calibrate`` CLI pair and the caching
benchmark's ``--tiny`` path, on tiny random pipelines (CPU)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from test_caching import embeds, tiny_wan_pipeline

import dit_accel.api as api
from dit_accel.caching import install_cache, load_schedule, resample_schedule, save_schedule
from dit_accel.calibration.cli import add_arguments, captions_for_testbed, run
from dit_accel.calibration.schedule_search import calibrate
from dit_accel.calibration.search import plan_budget, search_schedule

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("caching_compare", ROOT / "benchmarks" / "caching_compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["caching_compare"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# --- the search --------------------------------------------------------------------------------------
def _brute_force(cost, n, k, forced, cap):
    best = (float("inf"), None)
    for chosen in itertools.combinations(range(1, n), k - 1):
        computed = {0, *chosen}
        if not forced <= computed:
            continue
        total, prev, last, run_len, ok = 0.0, -1, 0, 0, True
        for u in range(1, n):
            if u in computed:
                prev, last, run_len = last, u, 0
                continue
            run_len += 1
            c = cost(prev, last, u)
            if run_len > cap or c is None:
                ok = False
                break
            total += c
        if ok and total < best[0]:
            best = (total, [1 if i in computed else 0 for i in range(n)])
    return best


@pytest.mark.parametrize("order", [0, 1])
def test_search_schedule_is_exact(order):
    rng = random.Random(order)
    n, cap = 9, 2
    table0 = {(s, u): rng.random() for s in range(n) for u in range(s + 1, n)}
    table1 = {(p, s, u): rng.random() for p in range(n) for s in range(p + 1, n) for u in range(s + 1, n)}

    def cost(prev, last, u):
        return table1[(prev, last, u)] if order and prev >= 0 else table0[(last, u)]

    for k, forced in [(4, {8}), (5, {1, 8}), (6, {8})]:
        schedule, value = search_schedule(cost, n, k, forced=forced, max_consecutive_reuse=cap)
        expected, _ = _brute_force(cost, n, k, forced | {0}, cap)
        assert value == pytest.approx(expected)
        assert sum(schedule) == k and schedule[0] == 1 and all(schedule[f] for f in forced)
    with pytest.raises(ValueError, match=r"no schedule with 3 computed steps of 9 meets the guardrails"):
        search_schedule(cost, n, 3, forced={8}, max_consecutive_reuse=cap)  # 0, 3, 6, 8 is the sparsest


def test_plan_budget_counts_block_evaluations():
    assert plan_budget(20, 6, 0.5, always_blocks=0, selective_blocks=1, selective_share=0.0) == (10, 0)
    # head + tail blocks run on every step: fewer full steps fit
    assert plan_budget(20, 6, 0.5, always_blocks=1, selective_blocks=1, selective_share=0.0) == (8, 0)
    k, m = plan_budget(20, 6, 0.5, always_blocks=0, selective_blocks=1, selective_share=0.25)
    assert (k, m) == (7, 13) and k * 6 + m * 1 <= 0.5 * 20 * 6
    # selective steps on a quarter of the tokens of a 6-block span cost 1.5 block evaluations each
    k, m = plan_budget(20, 6, 0.5, always_blocks=0, selective_blocks=0, selective_share=0.25, selective_tokens=0.25)
    assert (k, m) == (7, 12) and k * 6 + m * 1.5 <= 0.5 * 20 * 6


# --- calibrate end to end ------------------------------------------------------------------------------
def _prompts():
    return [dict(prompt_embeds=embeds(10 + i), negative_prompt_embeds=embeds(20 + i), height=16, width=16,
                 num_frames=5, guidance_scale=4.0) for i in range(2)]


def test_calibrate_writes_a_schedule_that_fixed_and_procache_load(tmp_path):
    pipe = tiny_wan_pipeline()
    path = tmp_path / "schedule.json"
    data = calibrate(pipe, _prompts(), num_steps=10, budget=0.5, out=path, model_id="tiny-wan",
                     warmup_steps=1, final_steps=1, max_consecutive_reuse=3, selective_share=0.25, refine=3)
    assert api.get_handle(pipe) is None  # calibrate removed what it attached
    loaded = load_schedule(path)
    assert loaded["schedule"] == data["schedule"] and loaded["model"] == "tiny-wan" and loaded["num_steps"] == 10
    schedule = data["schedule"]
    assert schedule[0] == 1 and schedule[-1] == 1 and 2 in schedule
    # selective deep steps keep a front residual: no forecast is searched (at most two stream tensors per branch)
    assert data["forecast_order"] == 0
    assert set(data["errors"]["expected_cost_by_order"]) == {"0"}
    assert data["compute_fraction"] <= 0.5 + 1e-9
    measured = data["errors"]["measured"]
    assert {m["source"] for m in measured} >= {"dp_order0"} and 1 <= len(measured) <= 5  # DP, uniform, 3 moves
    best = min(measured, key=lambda m: m["relative_mse"])
    assert best["schedule"] == schedule and best["order"] == data["forecast_order"]
    run_len = 0
    for v in schedule:  # the cap on consecutive non-computed steps
        run_len = 0 if v == 1 else run_len + 1
        assert run_len <= 3

    handle = api.apply(pipe)
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "procache", schedule_file=str(path),
                        warmup_steps=1, final_steps=1, max_consecutive_reuse=3)
    pipe(**_prompts()[0], num_inference_steps=10, output_type="latent")
    decisions = [r["decision"] for r in att.stats() if r["branch"] == "cond"]
    assert decisions == [{1: "compute", 0: "reuse", 2: "selective"}[v] for v in schedule]
    assert att.summary()["compute_fraction"] == pytest.approx(data["compute_fraction"])
    assert att.controller.scheduler.order == data["forecast_order"]
    att.remove()
    att = install_cache(pipe.transformer, handle.contexts["transformer"], "fixed", schedule_file=str(path), warmup_steps=1)
    pipe(**_prompts()[0], num_inference_steps=10, output_type="latent")
    assert [r["decision"] for r in att.stats() if r["branch"] == "cond"] == ["reuse" if v == 0 else "compute" for v in schedule]
    att.remove()
    handle.remove()


def test_calibrate_argument_errors():
    pipe = tiny_wan_pipeline()
    with pytest.raises(ValueError, match="calibrate needs at least one prompt"):
        calibrate(pipe, [], num_steps=8, budget=0.5)
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\], got 1.5"):
        calibrate(pipe, _prompts(), num_steps=8, budget=1.5)
    with pytest.raises(ValueError, match="forecast_order must be 0, 1 or 'auto', got 2"):
        calibrate(pipe, _prompts(), num_steps=8, budget=0.5, forecast_order=2)


def test_schedule_files_are_validated_and_resampled(tmp_path):
    good = {"format": "dit-accel-cache-schedule", "version": 1, "num_steps": 4, "schedule": [1, 0, 2, 1]}
    save_schedule(good, tmp_path / "ok.json")
    assert load_schedule(tmp_path / "ok.json")["schedule"] == [1, 0, 2, 1]
    for bad, message in [
        (dict(good, format="other"), "'format' must be 'dit-accel-cache-schedule'"),
        (dict(good, version=9), "unsupported version 9"),
        (dict(good, schedule=[1, 3, 0, 1]), "'schedule' must be a non-empty list of 0/1/2"),
        (dict(good, num_steps=5), r"'num_steps' 5 != len\(schedule\) 4"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_schedule(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_schedule(tmp_path / "broken.json")
    assert resample_schedule([1, 0, 0, 1], 4) == [1, 0, 0, 1]
    assert resample_schedule([1, 0, 0, 1], 7) == [1, 0, 0, 1, 0, 1, 1]  # the first two steps kept
    assert resample_schedule([1, 0, 1, 0, 1], 3) == [1, 0, 1]
    # selective steps stay selective where the original's computed steps are mostly selective
    assert resample_schedule([1, 1, 2, 0, 2, 0, 2, 1], 12) == SELECTIVE_12
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        resample_schedule([1, 0], 0)


SELECTIVE_12 = [1, 1, 2, 0, 2, 0, 2, 0, 2, 1, 0, 1]
"""[1, 1, 2, 0, 2, 0, 2, 1] resampled to 12 steps: selective where the original is selective, its last step kept."""


@pytest.mark.parametrize("num_steps", [6, 8, 12, 30, 50])
def test_resampled_preset_schedules_keep_their_compute_share_and_order(num_steps: int) -> None:
    from dit_accel.presets import get_preset

    shares = []
    for name in ("quality", "balanced", "fast", "turbo"):
        schedule = list(get_preset(name).cache_config["schedule"])
        out = resample_schedule(schedule, num_steps)
        assert len(out) == num_steps and out[0] == schedule[0] and out[-1] == schedule[-1]
        share = sum(1 for v in out if v) / num_steps
        target = sum(1 for v in schedule if v) / len(schedule)
        assert abs(share - target) <= 1.5 / num_steps + 0.05, (name, num_steps, out)
        shares.append(share)
    assert shares == sorted(shares, reverse=True), shares  # quality computes most, turbo least


# --- command line and benchmark --------------------------------------------------------------------------
def test_calibrate_command_line(tmp_path, monkeypatch, capsys):
    bench = _load_benchmark()
    import dit_accel.loading

    monkeypatch.setattr(dit_accel.loading, "load_pipeline", lambda model, device, dtype: bench.tiny_testbed_pipeline())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "s.json"
    args = parser.parse_args(["--steps", "6", "--budget", "0.6", "--out", str(out), "--num-prompts", "1",
                              "--height", "16", "--width", "16", "--frames", "2", "--warmup-steps", "1"])
    assert run(args) == 0
    assert "compute_fraction" in capsys.readouterr().out
    data = load_schedule(out)
    assert data["model"] == "testbed" and data["num_steps"] == 6 and data["prompts"] == captions_for_testbed(1)
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        run(args)
    # The same through the dit-accel command line: a clean one-line error, exit code 2.
    from dit_accel import cli

    assert cli.main(["calibrate", "--steps", "6", "--budget", "0.6", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_captions_for_testbed_follow_the_grammar():
    from dit_accel.testbed.captions import parse_caption

    prompts = captions_for_testbed(16, offset=100)
    assert len(set(prompts)) == 16
    for p in prompts:
        parse_caption(p)  # raises on captions outside the grammar


def test_benchmark_tiny_path(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "cc.json"
    report = bench.main(["--tiny", "--num-prompts", "1", "--calib-prompts", "1", "--steps", "6", "--fractions", "0.5",
                         "--methods", "fixed", "taylor", "procache_dp", "diffusers_fbc", "--tune-iterations", "2",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    full = [r for r in saved["results"] if r["target_fraction"] == 1.0]
    assert [r["method"] for r in full] == ["fixed"] and full[0]["psnr_mean"] == 100.0  # hooks computing all = dense
    rows = {r["method"]: r for r in saved["results"] if r["target_fraction"] == 0.5}
    assert set(rows) == {"fixed", "taylor", "procache_dp", "diffusers_fbc"}
    for name in ("fixed", "taylor", "procache_dp"):
        assert rows[name]["measured_fraction"] == pytest.approx(0.5)  # 3 of 6 steps, counted from block runs
    for row in rows.values():
        assert 0.0 < row["ssim_mean"] <= 1.0 and row["psnr_mean"] > 0
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    assert {"device", "versions", "date", "settings"} <= set(saved)


def test_combined_benchmark_tiny_path(tmp_path):
    """benchmarks/combined_quality.py --tiny: schedules calibrated and written, one row per (cache, attention)
    pair except dense x none, block fractions counted, PSNR against dense."""
    spec = importlib.util.spec_from_file_location("combined_quality", ROOT / "benchmarks" / "combined_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["combined_quality"] = module
    spec.loader.exec_module(module)
    report = module.main(["--tiny", "--out-dir", str(tmp_path), "--attention", "dense", "draft q1.0", "--steps", "4"])
    saved = json.loads((tmp_path / "combined_quality_tiny.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    pairs = [(r["cache"], r["attention"]) for r in saved["results"]]
    assert pairs == [("none", "draft q1.0")] + [(c, a) for c in ("procache b0.50", "procache b0.35", "fixed b0.35")
                                                for a in ("dense", "draft q1.0")]
    rows = {pair: r for pair, r in zip(pairs, saved["results"])}
    assert rows[("none", "draft q1.0")]["psnr_mean"] == 100.0  # tiny sequences: the sparse path declines, exact
    assert rows[("procache b0.50", "dense")]["block_fraction"] == pytest.approx(0.5)
    for r in saved["results"]:
        assert r["attention_work"] == pytest.approx(r["block_fraction"] * r["attention_density"])
    for f in ("0.50", "0.35"):
        assert load_schedule(tmp_path / f"caching_schedule_testbed_4steps_b{f}.json")["num_steps"] == 4
