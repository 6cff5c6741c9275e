"""Feature caching combined with sparse attention on the testbed: compute fraction x attention density x PSNR.

For every pair (cache setting, attention setting) the same prompts and seeds are generated and compared
with the dense videos (PSNR/SSIM). Cache settings: none, ``procache`` with schedules calibrated here at
50 % and 35 % of the block evaluations (``dit-accel calibrate``'s search on tuning prompts disjoint from
the evaluation prompts), and the uniform ``fixed`` schedule at 35 %. Attention settings: dense and the
sparse methods at the presets' quality settings (draft 1.0 / 0.6, combo 0.8 / 0.6 without drift check).

Reported per row: the block compute fraction (counted as in ``caching_compare.py``), the mean density of
the self-attention calls that ran (dense calls count 1.0) and their product, the share of dense
attention work done (cached steps run no attention).

An optional memory pass (``--memory-from caching_compare.json``) re-runs the methods of that comparison
at their tuned parameters on one prompt each and records their peak CUDA memory over the memory
allocated when the run started (the comparison's first GPU run measured without that baseline).

    python benchmarks/combined_quality.py --out-dir /tmp/x                 # GPU, evaluation size, 8 prompts
    python benchmarks/combined_quality.py --tiny --out-dir /tmp/x          # CPU smoke run, random tiny testbed
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import dit_accel  # noqa: E402
from caching_compare import (  # noqa: E402
    BlockCounter,
    RunSettings,
    _reset_peak,
    _version,
    build_methods,
    generate,
    psnr,
    ssim,
    tiny_testbed_pipeline,
    uniform_schedule,
)
from dit_accel.caching import ProCacheConfig, FixedCacheConfig  # noqa: E402
from dit_accel.calibration.cli import captions_for_testbed  # noqa: E402
from dit_accel.calibration.schedule_search import calibrate  # noqa: E402

ATTENTION_SETTINGS: list[tuple[str, str, dict[str, Any]]] = [
    ("dense", "dense", {}),
    ("draft q1.0", "draft", {"quality": 1.0}),
    ("draft q0.6", "draft", {"quality": 0.6}),
    ("combo q0.8", "combo", {"quality": 0.8}),
    ("combo q0.6 nodrift", "combo", {"quality": 0.6, "drift_check": False}),
]
"""(label, method, options): the presets' settings plus a sparser draft."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="random tiny testbed on CPU (smoke run)")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--num-prompts", type=int, default=None, help="evaluation prompts (default 8; tiny 1)")
    p.add_argument("--calib-prompts", type=int, default=None, help="calibration prompts (default 2; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="default 20; tiny 6")
    p.add_argument("--refine", type=int, default=None, help="calibration candidates run for real (default 6; tiny 1)")
    p.add_argument("--attention", nargs="+", default=None, help="labels of ATTENTION_SETTINGS to run (default all)")
    p.add_argument("--memory-from", type=Path, default=None, help="caching_compare JSON whose methods get a memory pass")
    p.add_argument("--code-commit", default=None, help="commit of dit_accel/attention and kernels used (recorded)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tiny = args.tiny
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    steps = args.steps or (6 if tiny else 20)
    s = RunSettings(steps=steps, height=16 if tiny else 256, width=16 if tiny else 256, frames=4 if tiny else 16,
                    guidance=5.0, device=device)
    n_eval = args.num_prompts or (1 if tiny else 8)
    n_calib = args.calib_prompts or (1 if tiny else 2)
    refine = args.refine if args.refine is not None else (1 if tiny else 6)
    guard = dict(warmup_steps=1 if tiny else 2, final_steps=0, max_consecutive_reuse=3)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_json = args.out_dir / ("combined_quality_tiny.json" if tiny else "combined_quality.json")

    if tiny:
        pipe = tiny_testbed_pipeline(0).to(device, dtype)
    else:
        from dit_accel.testbed import load_testbed_pipeline

        pipe = load_testbed_pipeline(device=device, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
    eval_prompts = captions_for_testbed(n_eval, offset=100)
    calib_prompts = captions_for_testbed(n_calib, offset=0)

    # 1. Schedules (shipped with the package when they win; see caching_compare.json).
    schedules: dict[str, str] = {}
    for fraction in (0.5, 0.35):
        path = args.out_dir / f"caching_schedule_testbed_{steps}steps_b{fraction:.2f}.json"
        budget = max(1, round(fraction * steps)) / steps
        calibrate(pipe, calib_prompts, num_steps=steps, budget=budget, out=path, model_id="testbed-tiny" if tiny else "testbed",
                  selective_share=0.0, refine=refine, forecast_order="auto",
                  call_kwargs=dict(num_frames=s.frames, height=s.height, width=s.width, guidance_scale=s.guidance), **guard)
        schedules[f"{fraction:.2f}"] = str(path)

    caches: list[tuple[str, Any]] = [
        ("none", None),
        ("procache b0.50", ProCacheConfig(schedule_file=schedules["0.50"], selective_blocks=0, **guard)),
        ("procache b0.35", ProCacheConfig(schedule_file=schedules["0.35"], selective_blocks=0, **guard)),
        ("fixed b0.35", FixedCacheConfig(schedule=uniform_schedule(steps, 0.35, guard["warmup_steps"], 0),
                                         **dict(guard, max_consecutive_reuse=steps))),
    ]
    attention = [a for a in ATTENTION_SETTINGS if args.attention is None or a[0] in args.attention]

    counter = BlockCounter(pipe)
    dense = [generate(pipe, p, i, s)[0] for i, p in enumerate(eval_prompts)]
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {
        "benchmark": "combined_quality",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "diffusers": _version("diffusers"), "triton": _version("triton"),
                     "python": platform.python_version()},
        "code_commit": args.code_commit,
        "settings": {"tiny": tiny, "steps": steps, "height": s.height, "width": s.width, "frames": s.frames,
                     "guidance": s.guidance, "dtype": str(dtype), "eval_prompts": eval_prompts,
                     "calib_prompts": calib_prompts, "guardrails": guard, "refine": refine},
        "schedules": {k: json.loads(Path(v).read_text())["schedule"] for k, v in schedules.items()},
        "schedule_orders": {k: json.loads(Path(v).read_text())["forecast_order"] for k, v in schedules.items()},
        "results": rows,
        "note": "block_fraction: executed blocks / (calls x blocks), counted; attention_density: mean density of the "
                "self-attention calls that ran (dense calls 1.0); attention_work = block_fraction x attention_density "
                "(share of dense attention work; cached steps run no attention); PSNR/SSIM vs dense, same seeds",
    }

    def write() -> None:
        out_json.write_text(json.dumps(report, indent=1))

    for cache_label, cache_cfg in caches:
        for att_label, method, options in attention:
            if cache_cfg is None and method == "dense":
                continue
            row: dict[str, Any] = {"cache": cache_label, "attention": att_label}
            try:
                handle = dit_accel.apply(pipe, attention=dit_accel.get_method(method, **options), cache=cache_cfg)
                counter.reset()
                handle.reset_stats()
                psnrs, ssims = [], []
                try:
                    for i, p in enumerate(eval_prompts):
                        video, _ = generate(pipe, p, i, s)
                        psnrs.append(psnr(video, dense[i]))
                        ssims.append(ssim(video, dense[i]))
                    att_stats = handle.stats_summary()
                finally:
                    dit_accel.remove(pipe)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(cache_label, att_label, "ERROR", row["error"], flush=True)
                write()
                continue
            density = att_stats["mean_density"] if att_stats["mean_density"] is not None else 1.0
            row.update({
                "block_fraction": counter.fraction, "attention_density": density,
                "attention_work": counter.fraction * density,
                "sparse_calls": att_stats["sparse_calls"], "attention_calls": att_stats["attention_calls"],
                "psnr_mean": statistics.fmean(psnrs), "psnr_std": statistics.pstdev(psnrs),
                "ssim_mean": statistics.fmean(ssims), "psnr_per_prompt": psnrs,
            })
            rows.append(row)
            print(f"{cache_label:16s} {att_label:20s} blocks {row['block_fraction']:.3f} density {density:.3f} "
                  f"work {row['attention_work']:.3f} PSNR {row['psnr_mean']:6.2f} SSIM {row['ssim_mean']:.4f}", flush=True)
            write()
    counter.remove()

    if args.memory_from is not None and cuda:
        report["memory"] = memory_pass(pipe, json.loads(args.memory_from.read_text()), s, guard, schedules, eval_prompts[0])
        write()
    plot(rows, args.out_dir / (out_json.stem + ".png"))
    write()
    print(f"wrote {out_json}", flush=True)
    return report


def memory_pass(pipe: Any, compare: dict[str, Any], s: RunSettings, guard: dict[str, int], schedules: dict[str, str],
                prompt: str) -> list[dict[str, Any]]:
    """Peak CUDA memory over the run's start of each comparison method at its tuned parameter (one prompt).

    Ours with a calibrated schedule file use the schedules calibrated in this run (same search and
    settings); the other rows reuse the comparison's parameter as recorded.
    """
    methods = build_methods(s, dict(compare["settings"]["guardrails"]))
    out: list[dict[str, Any]] = []
    start = _reset_peak()
    generate(pipe, prompt, 0, s)
    out.append({"method": "dense", "peak_over_start_bytes": torch.cuda.max_memory_allocated() - start})
    for row in compare["results"]:
        name, param = row["method"], row.get("param")
        if "error" in row or param is None or name not in methods:
            continue
        if isinstance(param, str):
            if name != "procache_dp":
                continue  # selective variants: exact cached bytes are in the comparison's own_cache_stats
            param = schedules.get(f"{row['target_fraction']:.2f}")
            if param is None:
                continue
        method = methods[name]
        entry: dict[str, Any] = {"method": name, "target_fraction": row["target_fraction"]}
        try:
            token = method.enable(pipe, param)
            try:
                start = _reset_peak()
                generate(pipe, prompt, 0, s)
                entry["peak_over_start_bytes"] = torch.cuda.max_memory_allocated() - start
                if method.summary is not None:
                    entry["own_cache_stats"] = method.summary(token)
            finally:
                method.disable(pipe, token)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        out.append(entry)
        print("memory", entry, flush=True)
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """PSNR vs attention work (block fraction x density), one marker per cache setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for cache in sorted({r["cache"] for r in rows}):
        pts = [r for r in rows if r["cache"] == cache and "psnr_mean" in r]
        ax.scatter([r["attention_work"] for r in pts], [r["psnr_mean"] for r in pts], label=f"cache: {cache}")
        for r in pts:
            ax.annotate(r["attention"], (r["attention_work"], r["psnr_mean"]), fontsize=6)
    ax.set_xlabel("attention work vs dense (block fraction x attention density)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title("Testbed 256x256x16, 20 steps: caching x sparse attention")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
