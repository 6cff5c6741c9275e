"""Tests of benchmarks/sparse_speed.py on CPU: the preset rows (densities from an eval report or the command
line, the density fit, the composed speed-up), the summary and the partial write when cut short."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sparse_speed", ROOT / "benchmarks" / "sparse_speed.py")
ss = importlib.util.module_from_spec(_spec)
sys.modules["sparse_speed"] = ss
_spec.loader.exec_module(ss)

from dit_accel.attention.base import SparsePlan  # noqa: E402
from dit_accel.attention.blocks import permute_tokens  # noqa: E402
from dit_accel.attention.registry import get_method  # noqa: E402
from dit_accel.kernels import block_mask_density  # noqa: E402
from dit_accel.presets import get_preset  # noqa: E402


def _report(tmp_path: Path, summaries: dict[str, dict]) -> Path:
    configs = [{"label": "dense", "attention_summary": None, "acceleration": None}]
    for name, summary in summaries.items():
        configs.append({"label": f"preset:{name}", "attention_summary": summary, "acceleration": {"preset": f"{name}@3"}})
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"configs": configs}))
    return path


def test_report_densities_are_the_sparse_calls_mean(tmp_path):
    # 300 calls, 100 of them dense (counting 1.0), mean 0.8 over all: the 200 sparse calls average 0.7
    path = _report(tmp_path, {"turbo": {"attention_calls": 300, "sparse_calls": 200, "mean_density": 0.8},
                              "quality": {"attention_calls": 10, "sparse_calls": 10, "mean_density": 0.5}})
    got = ss.parse_preset_densities(str(path))
    assert [g.preset for g in got] == ["quality", "turbo"]  # PRESET_ORDER, whatever the report's order
    assert got[0].density == pytest.approx(0.5) and got[0].mean_density_all_calls == pytest.approx(0.5)
    assert got[1].density == pytest.approx(0.7)
    assert got[1].mean_density_all_calls == pytest.approx(0.8)
    assert (got[1].attention_calls, got[1].sparse_calls, got[1].measured_as) == (300, 200, "turbo@3")
    assert got[1].source == f"report:{path}"


def test_committed_report_densities():
    got = ss.parse_preset_densities(ss.DEFAULT_PRESET_REPORT)
    assert [g.preset for g in got] == list(ss.PRESET_ORDER)
    data = json.loads((ROOT / ss.DEFAULT_PRESET_REPORT).read_text())
    for g in got:
        summary = next(c for c in data["configs"] if c["label"] == f"preset:{g.preset}")["attention_summary"]
        dense_calls = summary["attention_calls"] - summary["sparse_calls"]
        total = g.density * summary["sparse_calls"] + dense_calls  # back to the all-calls mean
        assert total / summary["attention_calls"] == pytest.approx(summary["mean_density"])
        assert g.density < g.mean_density_all_calls  # the valves' dense calls raise the all-calls mean
    # sparser presets run sparser calls
    assert [g.density for g in got] == sorted((g.density for g in got), reverse=True)


def test_command_line_densities():
    named = ss.parse_preset_densities("turbo=0.45, quality=0.7")
    assert [(g.preset, g.density, g.source) for g in named] == [("quality", 0.7, "command line"), ("turbo", 0.45, "command line")]
    assert named[0].mean_density_all_calls is None
    positional = ss.parse_preset_densities("0.68,0.62,0.56,0.455")
    assert [(g.preset, g.density) for g in positional] == list(zip(ss.PRESET_ORDER, (0.68, 0.62, 0.56, 0.455)))
    for bad, match in (("0.7,0.6", "needs 4"), ("quality=0.7,0.6", "mixes"), ("best=0.5", "unknown preset"),
                       ("quality=1.5", r"\(0, 1\]"), ("quality=0", r"\(0, 1\]"), ("quality=x", "not a number"),
                       ("quality=0.5,quality=0.6", "twice"), ("", "empty"), ("missing/report.json", "cannot read")):
        with pytest.raises(ValueError, match=match):
            ss.parse_preset_densities(bad)


def test_amortised_plan_known_answer():
    # 42 sparse calls, refresh every 5: 9 refreshes (the first call is one), 33 reuses
    per_period, per_generation = ss.amortised_plan_ms(1.0, 0.1, 5)
    assert per_period == pytest.approx((1.0 + 4 * 0.1) / 5)
    assert per_generation == pytest.approx((9 * 1.0 + 33 * 0.1) / 42)


def test_fit_top_p_bisects_a_monotone_density():
    calls = []

    def plan_density(p):  # floor 0.2, steps of 0.01 above it
        calls.append(p)
        return max(0.2, math.floor(p * 100) / 100), f"plan@{p}"

    p, d, plan = ss.fit_top_p(plan_density, 0.6)
    assert d == pytest.approx(0.6, abs=0.01) and plan == f"plan@{p}" and len(calls) <= 22
    assert ss.fit_top_p(plan_density, 0.1)[:2] == (1e-4, 0.2)  # below the floor: the floor, recorded as reached
    assert ss.fit_top_p(plan_density, 1.0)[:2] == (1.0, 1.0)


def test_tile_order_copy_keeps_the_diffusers_layout():
    x = torch.randn(1, 5, 3, 4).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D) memory
    perm = torch.tensor([2, 0, 4, 1, 3])
    got = ss.tile_order_copy(x, perm)
    assert torch.equal(got, permute_tokens(x, perm))
    assert got.transpose(1, 2).is_contiguous()


def test_random_head_mask_density():
    keep = ss.random_head_mask(4, 64, 0.4, torch.device("cpu"))
    assert keep.shape == (1, 4, 64, 64)
    assert keep.float().mean().item() == pytest.approx(0.4, abs=0.02)
    assert keep[0, :, torch.arange(64), torch.arange(64)].all()


def _run(tmp_path: Path, *extra: str) -> dict:
    argv = ["--tiny", "--out", str(tmp_path), "--reps", "1", "--name", "t", *extra]
    assert ss.main(argv) == 0
    return json.loads((tmp_path / "t.json").read_text())


def test_preset_rows_on_cpu(tmp_path, capsys):
    out = _run(tmp_path, "--labels", "none", "--skip-fixed", "--preset-densities", "quality=0.7,turbo=0.45")
    assert out["complete"] is True and "preset" in out["row_kinds"]
    assert {"device", "torch", "triton", "diffusers", "date"} <= set(out["env"])
    assert [r["row"] for r in out["rows"]] == ["dense", "preset", "preset", "dense_repeat"]
    dense_ms = out["rows"][0]["ms"]
    rows = {r["preset"]: r for r in out["rows"] if r["row"] == "preset"}
    quality_tag, turbo_tag = get_preset("quality").tag, get_preset("turbo").tag
    assert set(rows) == {quality_tag, turbo_tag}
    grid = tuple(ss.SHAPES["tiny"]["grid"])
    S = grid[0] * grid[1] * grid[2]
    q, k, _ = ss.video_qkv(grid, ss.SHAPES["tiny"]["heads"], ss.SHAPES["tiny"]["head_dim"], torch.device("cpu"), torch.float32)
    for name, target in (("quality", 0.7), ("turbo", 0.45)):
        r = rows[get_preset(name).tag]
        preset = get_preset(name)
        assert r["target_density"] == target and r["density_source"] == "command line"
        assert r["mean_density_all_calls"] is None
        # the tiny shape has 2 heads x 8 x 8 tiles: the fit lands within a few tiles of the target
        assert r["density"] == pytest.approx(target, abs=0.03)
        assert r["token_order"] == "forward" and r["tile_stats"] is False and r["refresh_period"] == 5
        assert r["options"] == {k_: v_ for k_, v_ in preset.attention_config.items()}
        knob = get_method("combo", **dict(ss.VALVES_OFF, **preset.attention_config))
        assert r["knob_top_p"] == knob.cfg.resolved("top_p")
        # the timed mask is the preset's method at the fitted top_p, planned in tile order (no permutation)
        ctx, _ = ss.hand_call(grid, S, 0)
        ctx.token_order_tile = tuple(r["tile"])
        _, call = ss.hand_call(grid, S, 1, ctx)
        method = get_method("combo", **dict(ss.VALVES_OFF, **preset.attention_config, top_p=r["fitted_top_p"]))
        perm, _ = ss.tile_permutation(grid, tuple(r["tile"]), "cpu")
        plan = method.plan(ss.tile_order_copy(q, perm), ss.tile_order_copy(k, perm), call)
        assert not isinstance(plan, SparsePlan) or plan.perm is None
        assert block_mask_density(plan if not isinstance(plan, SparsePlan) else plan.mask) == pytest.approx(r["density"])
        # the composed figures
        assert r["plan_ms_per_call_50_steps"] == pytest.approx(ss.amortised_plan_ms(r["refresh_plan_ms"], r["reuse_plan_ms"], 5)[1])
        assert r["forward_perm_ms_per_call"] == pytest.approx(r["forward_perm_ms"] / ss.SHAPES["tiny"]["layers"])
        extra = r["plan_ms_per_call_50_steps"] + r["forward_perm_ms_per_call"]
        assert r["dense_ms"] == dense_ms
        assert r["speedup_vs_dense"] == pytest.approx(dense_ms / (r["kernel_ms"] + extra))
        assert r["kernel_speedup_vs_dense"] == pytest.approx(dense_ms / r["kernel_ms"])
        assert r["overhead"] == pytest.approx(extra / r["kernel_ms"])
        assert r["plan_share_50_steps"] == pytest.approx(r["plan_ms_per_call_50_steps"] / r["kernel_ms"])
        assert r["refresh_plan_share"] == pytest.approx(r["refresh_plan_ms"] / r["kernel_ms"])
        assert 0 < r["random_density"] <= 1 and r["kernel_random_ms"] > 0
    assert rows[turbo_tag]["fitted_top_p"] < rows[quality_tag]["fitted_top_p"]
    printed = capsys.readouterr().out
    assert f"| tiny | {quality_tag} | 0.700 (-) |" in printed and f"| tiny | {turbo_tag} | 0.450 (-) |" in printed


def test_preset_rows_without_attention(tmp_path):
    out = _run(tmp_path, "--skip-attention", "--labels", "none", "--preset-densities", ss.DEFAULT_PRESET_REPORT)
    assert [r["row"] for r in out["rows"]] == ["preset"] * 4
    for r in out["rows"]:
        assert "kernel_ms" not in r and "speedup_vs_dense" not in r
        assert r["refresh_plan_ms"] > 0 and r["reuse_plan_ms"] > 0 and r["mean_density_all_calls"] > r["target_density"]
        assert r["measured_as"].split("@")[0] == r["preset"].split("@")[0]  # the report may predate the version


def test_method_rows_and_summary(tmp_path, capsys):
    out = _run(tmp_path, "--labels", "draft/balanced,combo-reuse/balanced", "--skip-calibrate", "--breakdown",
               "--fixed-densities", "0.9,0.5")
    kinds = [r["row"] for r in out["rows"]]
    assert kinds == ["dense", "fixed_density", "fixed_density", "method", "method", "method", "amortised",
                     "plan_breakdown", "plan_breakdown", "dense_repeat"]
    assert [r["nominal_density"] for r in out["rows"] if r["row"] == "fixed_density"] == [0.9, 0.5]
    for r in (r for r in out["rows"] if r["row"] == "plan_breakdown"):
        # CPU: the torch path, which still compacts the bool selection once per plan (the kernel path: none)
        assert r["split_backend"] == "torch" and r["plan_compactions"] == 1 and r["plan_compactions_torch"] == 1, r
        assert r["rest_ms"] == pytest.approx(r["plan_ms"] - r["estimate_indices_ms"] - r["block_mask_ms"])
        assert "select_indices_ms" not in r  # no kernel on CPU
    capsys.readouterr()
    assert ss.main(["--summary", str(tmp_path / "t.json")]) == 0
    printed = capsys.readouterr().out
    assert "| tiny | combo-reuse/balanced, refresh call |" in printed
    assert "| tiny | combo-reuse/balanced, amortised (refresh every 5, 50 steps) |" in printed
    assert "| tiny | draft/balanced, every call |" in printed
    assert "| selection + mask rows | rest | compaction passes in the plan |" in printed


def test_cut_short_writes_what_was_measured(tmp_path, monkeypatch):
    def interrupted_shape(label, shape, device, dtype, reps, skip_attention, log, *args):
        log.append({"shape": label, "row": "dense", "backend": "x", "ms": 1.0})
        raise ss.Interrupted("signal 15")

    monkeypatch.setattr(ss, "bench_shape", interrupted_shape)
    assert ss.main(["--tiny", "--out", str(tmp_path), "--name", "t"]) == 1
    out = json.loads((tmp_path / "t.json").read_text())
    assert out["complete"] is False and out["interrupted"] == "signal 15"
    assert out["rows"] == [{"shape": "tiny", "row": "dense", "backend": "x", "ms": 1.0}]


def test_draft_map_tune_smoke(tmp_path: Path) -> None:
    """benchmarks/draft_map_tune.py on the tiny shape in the interpreter: every variant's map and BlockMask rows
    equal the shipped launch's, the best launch is one of the timed ones and is checked against the shipped one
    (the interpreter ignores warps and stages, so this checks the search and the record, not their effect)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # Three fields and one check round keep the interpreted runs few (the interpreter ignores warps and stages).
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "draft_map_tune.py"), "--tiny", "--reps", "1",
                           "--passes", "1", "--only", "map_rows,key_chunk,select_warps", "--rounds", "1",
                           "--out", str(tmp_path), "--name", "tune"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "tune.json").read_text())
    rows = result["search"]["tiny"]
    assert result["complete"] and len(rows) >= 4
    assert all(r["usable"] and r["max_abs_diff"] <= 1e-6 and r["rows_equal"] for r in rows)
    assert result["best"] in [r["launch"] for r in rows]
    tags = [(r["tag"], r["round"]) for r in result["check"]]
    assert tags == [("shipped", 0), ("best", 0)]
