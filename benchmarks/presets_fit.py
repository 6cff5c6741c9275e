"""The shipped presets' fit: their cache schedules and the predicted speed and quality of each preset on the testbed.

Two sections:

* ``schedules`` (runs the model): the testbed's reuse errors measured once on dense generations
  (:func:`dit_accel.calibration.measure.measure`, both forecast orders), then the exact schedule search at every
  budget of ``--budgets``; a budget's schedule is the one with the smaller expected cost over the two orders.
  Writes ``preset_schedules.json`` (the CPU run: 128x128 px x 8 frames, 20 steps, guidance 5, the two calibration
  prompts of the GPU schedule search in ``results/caching_schedule_testbed_20steps_b0.50.json``).
* ``predict`` (no model): for each preset, the predicted PSNR and speed-up on the testbed at 256x256 px x 16 frames
  on a GPU, from committed GPU measurements and the shipped cost table, and whether each faster preset is
  predicted faster than the one before. Writes ``presets_fit.json``. These are predictions, not measurements:
  ``benchmarks/gpu_run.sh adaptive_testbed`` measures them (``presets_testbed.json``).

The prediction model (all inputs are committed files, named in the output):

* speed-up of cache compute fraction ``f`` alone: piecewise linear in ``f`` through the measured ProCache points
  (testbed, H100, 20 steps, ``results/caching_compare.json``: ``procache_dp`` at 0.5 and 0.35, and the hooks
  computing every step at 1.0);
* the attention part on top: the self-attention share ``a`` of the generation (dense call time x calls / dense
  generation time: ``results/dense_backends.json``, ``results/eval_presets_gpu/report.json``) is scaled by the cost
  of the sparse calls (the shipped cost table at the sparse-call density of the preset's ``top_p``, 1 above the
  break-even density) plus their planning; warm-up, first-layer and last-step calls cost 1. Planning in two
  scenarios: ``upper`` (the planning time the GPU evaluation recorded, which contains a synchronisation, and our
  dense route's measured overhead, ``results/overhead_probe.json``) and ``lower`` (one refresh plan's device time,
  ``results/draft_map_tune.json``, over the refresh period);
* PSNR: the two parts' errors added (``10^(-psnr/10)``): the cache part log-linear in ``f`` through the ProCache
  points, the attention part from combo's ``top_p`` sweep (``results/sparse_quality_gpu_run2.json``).

    python benchmarks/presets_fit.py --sections schedules --out-dir benchmarks/results   # CPU, ~5 min
    python benchmarks/presets_fit.py --sections predict --out-dir benchmarks/results     # no model, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

CALIBRATION_PROMPTS = ["a blue circle moving right on a plain background",
                       "a white square moving up-left on a striped background"]
"""The prompts of the GPU schedule search behind the 0.5 and 0.35 schedules (``caching_schedule_testbed_*``)."""


def schedules_section(args: argparse.Namespace) -> dict[str, Any]:
    """Measure once, search every budget."""
    import torch

    import dit_accel
    from dit_accel.calibration.measure import PromptRunner, measure
    from dit_accel.calibration.search import search
    from dit_accel.calibration.settings import SearchSettings
    from dit_accel.testbed import load_testbed_pipeline

    pipe = load_testbed_pipeline("cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"height": args.height, "width": args.width, "num_frames": args.frames, "guidance_scale": args.guidance}
    guard = dict(warmup_steps=2, final_steps=0, max_consecutive_reuse=3)
    runner = PromptRunner(pipe, args.steps, 0, call, batch_size=len(CALIBRATION_PROMPTS))
    handle = dit_accel.apply(pipe)
    try:
        with torch.inference_mode():
            costs, _, num_blocks = measure(pipe, handle, CALIBRATION_PROMPTS,
                                           SearchSettings(num_steps=args.steps, budget=0.5, **guard), runner)
    finally:
        handle.remove()
    out: dict[str, Any] = {}
    for budget in args.budgets:
        result = search(costs, SearchSettings(num_steps=args.steps, budget=budget, **guard), num_blocks)
        schedule, expected, order = result.best
        out[f"{budget:g}"] = {"schedule": list(schedule), "order": order, "expected_cost": expected,
                              "expected_cost_by_order": {str(k): v for k, v in result.expected_by_order.items()},
                              "compute_fraction": sum(schedule) / len(schedule)}
        print(f"budget {budget:g}: {''.join(map(str, schedule))} order {order} cost {expected:.4f}", flush=True)
    return {"prompts": CALIBRATION_PROMPTS, "call": call, "steps": args.steps, "guardrails": guard,
            "num_blocks": num_blocks, "schedules": out,
            "size_note": "CPU-size measurement (the GPU size is 256x256 x 16)"}


# ------------------------------------------------------------------------------------------- predict
def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _interp(x: float, points: list[tuple[float, float]]) -> float:
    """Piecewise-linear through ``points``, extended linearly past the ends."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1 or (x1, y1) == pts[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def _mse(psnr: float) -> float:
    return 10 ** (-psnr / 10)


def _psnr(mse: float) -> float:
    return -10 * math.log10(mse) if mse > 0 else 100.0


def predict_section(args: argparse.Namespace) -> dict[str, Any]:
    """Predicted PSNR and speed-up of every shipped preset on the testbed (see the module docstring)."""
    from dit_accel.attention.quality import knob_thresholds, quality_value
    from dit_accel.kernels.cost_model import shipped_table
    from dit_accel.presets import get_preset, preset_names

    caching = _load("caching_compare.json")
    rows = {(r["method"], r["target_fraction"]): r for r in caching["results"]}
    cache_speed = [(1.0, rows[("fixed", 1.0)]["speedup_vs_dense"])] + [
        (f, rows[("procache_dp", f)]["speedup_vs_dense"]) for f in (0.5, 0.35)]
    # PSNR of the cache alone: log-linear in f through the two measured points (MSE falls exponentially as f rises)
    cache_psnr = [(f, rows[("procache_dp", f)]["psnr_mean"]) for f in (0.5, 0.35)]

    sweep = _load("sparse_quality_gpu_run2.json")
    combo = sorted((r["options"]["top_p"], r["psnr"], r["sparse_call_density"]) for r in sweep["results"]
                   if r["method"] == "combo" and "top_p" in r["options"])
    attn_psnr = [(p, q) for p, q, _ in combo]
    attn_density = [(p, d) for p, _, d in combo]

    dense = _load("dense_backends.json")
    testbed_row = next(r for r in dense["rows"] if r["shape"].startswith("testbed"))
    report = _load("eval_presets_gpu/report.json")
    stock_s = next(c for c in report["configs"] if c["label"] == "dense")["speed"]["generate_s_mean"]
    calls_per_generation = 6 * 20 * 2  # layers x steps x guidance branches
    share = testbed_row["cudnn_ms"] * 1e-3 * calls_per_generation / stock_s
    measured_plan = [c["attention_summary"]["plan_ms_total"] / c["attention_summary"]["sparse_calls"]
                     for c in report["configs"] if (c.get("attention_summary") or {}).get("sparse_calls")]
    tune = _load("draft_map_tune.json")
    refresh_plan_ms = min(r["ms"] for rows_ in tune["search"].values() for r in rows_ if r.get("usable"))
    probe = _load("overhead_probe.json")
    route_factor = probe["ratio_vs_stock"]["apply_dense"]
    table = shipped_table()
    seq, head_dim = 16384, 64
    be = table.break_even_density(seq, head_dim)
    # upper: the planning time the evaluation recorded per sparse call (it contains one device synchronisation per
    # refresh, so GPU work queued before it) and our dense route's measured overhead; lower: one refresh plan's
    # device time (the draft map and selection at Wan2.1-1.3B 480p, the testbed's plan is smaller) per refresh period
    scenarios = {"upper": {"plan_ms_per_sparse_call": sum(measured_plan) / len(measured_plan), "route_factor": route_factor},
                 "lower": {"plan_ms_per_refresh": refresh_plan_ms, "route_factor": 1.0}}

    out: dict[str, Any] = {"inputs": {
        "cache_speedup_points": cache_speed, "cache_psnr_points": cache_psnr,
        "combo_top_p_psnr": attn_psnr, "combo_top_p_sparse_call_density": attn_density,
        "attention_share_of_generation": share, "dense_call_ms": testbed_row["cudnn_ms"],
        "break_even_density": be, "cost_table": {"device": table.device, "source": table.source},
        "scenarios": scenarios,
        "files": ["results/caching_compare.json", "results/sparse_quality_gpu_run2.json", "results/dense_backends.json",
                  "results/eval_presets_gpu/report.json", "results/draft_map_tune.json", "results/overhead_probe.json",
                  "dit_accel/kernels/cost_table.json"],
    }, "presets": {}}
    previous = None
    for name in preset_names():
        if name == "dense":
            continue
        p = get_preset(name)
        cfg = dict(p.attention_config)
        f = 1.0
        if p.cache is not None:
            schedule = list(dict(p.cache_config)["schedule"])
            f = sum(1 for v in schedule if v == 1) / len(schedule)
        cache_speedup = _interp(f, cache_speed)
        mse = _mse(_interp(f, cache_psnr)) if f < 1.0 else 0.0
        entry: dict[str, Any] = {"tag": p.tag, "compute_fraction": f, "cache_speedup": cache_speedup}
        if p.attention is not None:
            knob = knob_thresholds(quality_value(cfg.get("quality", "balanced")))
            top_p = cfg.get("top_p") or knob["top_p"]
            density = _interp(top_p, attn_density)
            routed = table.relative_cost(seq, head_dim, density) if density <= be else 1.0
            refresh = int(cfg.get("refresh_period") or knob["refresh_period"])
            sparse_share = (1 - knob["dense_warmup"] - 1 / 20) * (5 / 6)  # not warm-up, last step or first layer
            mse += _mse(_interp(top_p, attn_psnr))
            entry["attention"] = {"top_p": top_p, "sparse_call_density": density, "routed_kernel_cost": routed,
                                  "sparse_call_share": sparse_share}
            for label, sc in scenarios.items():
                plan_ms = sc.get("plan_ms_per_sparse_call", sc.get("plan_ms_per_refresh", 0.0) / refresh)
                cost = 1 - sparse_share + sparse_share * (routed + plan_ms / testbed_row["cudnn_ms"])
                factor = ((1 - share) + share * cost) / sc["route_factor"]
                entry[f"predicted_speedup_{label}"] = cache_speedup / factor
                entry["attention"][f"attention_cost_{label}"] = cost
        else:
            for label in scenarios:
                entry[f"predicted_speedup_{label}"] = cache_speedup
        entry["predicted_psnr"] = _psnr(mse) if mse > 0 else 100.0
        if previous is not None:
            prev = out["presets"][previous]
            entry["faster_than_previous"] = {label: entry[f"predicted_speedup_{label}"] > prev[f"predicted_speedup_{label}"]
                                             for label in scenarios}
        out["presets"][name] = entry
        previous = name
        print(f"{p.tag}: predicted {entry['predicted_speedup_lower']:.2f}-{entry['predicted_speedup_upper']:.2f}x "
              f"(cache alone {cache_speedup:.2f}x), {entry['predicted_psnr']:.1f} dB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="predict", help="comma-separated: schedules, predict")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.65, 0.5, 0.42, 0.35])
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    header = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if "schedules" in sections:
        data = dict(header, benchmark="preset_schedules", device="cpu", **schedules_section(args))
        (args.out_dir / "preset_schedules.json").write_text(json.dumps(data, indent=1) + "\n")
    if "predict" in sections:
        data = dict(header, benchmark="presets_fit", device="none (a prediction from committed GPU measurements)",
                    note="predicted, not measured: benchmarks/gpu_run.sh adaptive_testbed measures presets_testbed.json",
                    **predict_section(args))
        (args.out_dir / "presets_fit.json").write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
