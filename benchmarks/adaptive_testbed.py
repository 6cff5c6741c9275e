"""Acceptance checks of calibration and of fp8 on the shipped testbed: a ``--target-psnr`` calibration writes the
same file twice from one seed, keeps its target on held-out prompts and runs faster than ``balanced``; the sparse
method at full density in fp8 reaches 38 dB or more against stock, and each preset in fp8 stays within 0.5 dB of itself in bf16.

Sections (``--sections``, default both):

* ``calibration``: ``dit_accel.calibrate`` to ``--target-psnr`` on ``--prompts`` calibration captions (the
  testbed grammar, :func:`dit_accel.calibration.cli.captions_for_testbed`), run twice with the same seed; the two
  preset files must agree in everything but their timing fields. The chosen configuration is then evaluated on
  ``--heldout`` other prompts (held-out testbed scenes, :func:`dit_accel.eval.builtin_prompts`) against the stock
  pipeline: PSNR per video and wall-clock speed-up; and ``balanced``'s speed-up in the same run, for "faster than
  balanced". Writes ``calibration_testbed.json`` (``--out-dir``; the CPU run names it ``calibration_testbed_cpu.json``
  with ``--name``).
* ``fp8``: each preset with ``precision="fp8"`` against itself in bf16, and the full-density sparse method in fp8
  against the stock pipeline, PSNR on the held-out prompts; ``fp8_supported`` and the fallback reason recorded.
  Writes ``fp8_testbed.json``.

The presets' own speed and quality (``presets_testbed.json``) come from ``dit-accel bench --testbed-quality``;
``benchmarks/gpu_run.sh adaptive_testbed`` runs both in one call.

    python benchmarks/adaptive_testbed.py --device cuda --out-dir $OUT                  # H200: 256x256 x 16, 20 steps
    python benchmarks/adaptive_testbed.py --device cpu --height 128 --width 128 --frames 8 --steps 8 --guidance 1 \\
        --sections calibration --name calibration_testbed_cpu --out-dir benchmarks/results   # the CPU-size run
    python benchmarks/adaptive_testbed.py --tiny --out-dir /tmp/x                        # plumbing check (tests)

Timing is host wall clock around whole batched pipeline calls (CUDA synchronised). ``--tiny`` runs a random-weight
testbed at 128x128 x 4 frames for seconds: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _pipeline(args: argparse.Namespace, device: torch.device) -> Any:
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from sparse_helpers import tiny_testbed

        return tiny_testbed(num_layers=2).to(device)
    from dit_accel.testbed import load_testbed_pipeline

    pipe = load_testbed_pipeline(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _heldout(args: argparse.Namespace) -> list[str]:
    from dit_accel.eval import builtin_prompts

    return builtin_prompts(args.heldout, seed=args.seed)


def _psnr(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> list[float]:
    from dit_accel.calibration.target import _video
    from dit_accel.eval.metrics import psnr

    return [psnr(_video(o), _video(r)) for o, r in zip(outputs, reference)]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _preset_settings(name: str, precision: str | None = None) -> dict[str, Any]:
    from dit_accel.presets import get_preset

    p = get_preset(name)
    config = dict(p.attention_config)
    if precision is not None and p.attention is not None:
        config["precision"] = precision
    return {"attention": p.attention, "attention_config": config, "cache": p.cache, "cache_config": dict(p.cache_config)}


def _timed(pipe: Any, runner: Any, prompts: list[str], config: dict[str, Any] | None, warmup: bool) -> tuple[list, float, dict]:
    from dit_accel.calibration.target import run_configuration

    if warmup:
        run_configuration(pipe, runner, prompts[: runner.batch_size], config)
    return run_configuration(pipe, runner, prompts, config)


def calibration_section(args: argparse.Namespace, pipe: Any, device: torch.device, call: dict[str, Any]) -> dict[str, Any]:
    """Two calibrations with the same seed, then the chosen configuration on held-out prompts."""
    import dit_accel
    from dit_accel.calibration.cli import captions_for_testbed
    from dit_accel.calibration.measure import PromptRunner
    from dit_accel.preset_file import decode_floats, without_timing

    prompts = captions_for_testbed(args.prompts)
    options = dict(num_steps=args.steps, seed=args.seed, batch_size=args.batch_size, max_evals=args.max_evals,
                   time_budget_s=args.time_budget, timing_prompts=args.timing_prompts, progress=not args.no_progress,
                   call_kwargs=call, model_id="testbed-tiny" if args.tiny else "testbed")
    if args.budgets:
        options["budgets"] = tuple(args.budgets)
    if args.top_ps:
        options["top_ps"] = tuple(args.top_ps)
    runs = []
    for i in range(2):
        start = time.perf_counter()
        data = dit_accel.calibrate(pipe, prompts, target_psnr=args.target_psnr, **options)
        runs.append({"preset_file": data, "wall_s": time.perf_counter() - start})
        print(f"calibration run {i + 1}: {data['measured'].get('candidate', 'dense')} at {data['measured']['psnr']} dB, "
              f"speed-up {data['timing'].get('speedup')}, {runs[-1]['wall_s']:.0f} s", flush=True)
    chosen = decode_floats(runs[0]["preset_file"]["settings"])
    heldout = _heldout(args)
    runner = PromptRunner(pipe, args.steps, args.seed, dict(call), batch_size=args.batch_size, output_type="pt")
    warm = device.type == "cuda"  # Triton compiles and autotunes on first use; nothing to warm on CPU
    stock, stock_s, _ = _timed(pipe, runner, heldout, None, warmup=warm)
    outs, chosen_s, summary = _timed(pipe, runner, heldout, chosen, warmup=warm)
    values = _psnr(outs, stock)
    bal_outs, balanced_s, _ = _timed(pipe, runner, heldout, _preset_settings("balanced"), warmup=warm)
    result = {
        "calibration_prompts": prompts,
        "heldout_prompts": heldout,
        **run_rows(runs, args.seed, _mean(values)),
        "heldout": {
            "psnr_mean": _mean(values), "psnr_per_prompt": values, "psnr_min": min(values),
            "meets_target": _mean(values) >= args.target_psnr,
            "stock_s": stock_s, "calibrated_s": chosen_s, "speedup_vs_stock": stock_s / chosen_s,
            "balanced_s": balanced_s, "balanced_speedup_vs_stock": stock_s / balanced_s,
            "balanced_psnr_mean": _mean(_psnr(bal_outs, stock)),
            "faster_than_balanced": chosen_s < balanced_s,
            "mean_density": summary.get("mean_density"), "dense_head_share": summary.get("dense_head_share"),
            "compute_fraction": summary.get("compute_fraction"),
        },
    }
    print(f"held-out: {result['heldout']['psnr_mean']:.2f} dB, {result['heldout']['speedup_vs_stock']:.2f}x "
          f"(balanced {result['heldout']['balanced_speedup_vs_stock']:.2f}x); same file: "
          f"{result['same_file_but_timing']}", flush=True)
    return result


def run_rows(runs: list[dict[str, Any]], seed: int, heldout_psnr: float) -> dict[str, Any]:
    """The runs as the docs read them (seed, measured speed-up, PSNR on the calibration and held-out prompts, the
    sha256 of the preset file without its timing fields) with each full preset file, and whether the two files
    agree but for timing."""
    import hashlib

    from dit_accel.preset_file import encode_floats, without_timing

    texts = [json.dumps(encode_floats(without_timing(r["preset_file"])), sort_keys=True) for r in runs]
    rows = [{"seed": seed, "speedup_vs_stock": r["preset_file"]["timing"].get("speedup"),
             "psnr_db_calibration": r["preset_file"]["measured"].get("psnr"), "psnr_db_heldout": heldout_psnr,
             "file_sha256": hashlib.sha256(t.encode()).hexdigest(), "wall_s": r["wall_s"],
             "preset_file": r["preset_file"]} for r, t in zip(runs, texts)]
    a, b = (json.loads(t) for t in texts)
    return {"runs": rows, "same_file_but_timing": texts[0] == texts[1],
            "differing_fields": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))}


def fp8_section(args: argparse.Namespace, pipe: Any, device: torch.device, call: dict[str, Any]) -> dict[str, Any]:
    """Each preset in fp8 against itself in bf16; the full-density sparse method in fp8 against stock."""
    from dit_accel.attention.precision import fp8_support_of, kernel_precision
    from dit_accel.calibration.measure import PromptRunner
    from dit_accel.presets import preset_names

    heldout = _heldout(args)
    runner = PromptRunner(pipe, args.steps, args.seed, dict(call), batch_size=args.batch_size, output_type="pt")
    probe = torch.zeros(1, 1, 128, 64, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    out: dict[str, Any] = {"fp8_support": list(fp8_support_of(probe)), "precision_that_runs": kernel_precision(probe, "fp8")[0],
                           "presets": {}}
    stock, _, _ = _timed(pipe, runner, heldout, None, warmup=False)
    full = {"attention": "combo", "attention_config": {
        "top_p": 1.0, "similarity_threshold": -1.0, "dense_warmup": 0.0, "dense_first_layers": 0,
        "dense_last_step": False, "min_seq_len": 0, "dense_above": None, "drift_check": False,
        "skip_threshold": float("-inf"), "precision": "fp8"}, "cache": None, "cache_config": None}
    warm = device.type == "cuda"
    fp8_full, _, _ = _timed(pipe, runner, heldout, full, warmup=warm)
    values = _psnr(fp8_full, stock)
    out["full_density_fp8_vs_stock"] = {"psnr_mean": _mean(values), "psnr_min": min(values),
                                        "criterion": ">= 38 dB", "met": _mean(values) >= 38.0}
    for i, name in enumerate(n for n in preset_names() if n != "dense"):
        # Triton compiles each kernel variant once: only the first preset of each precision needs a warm-up
        bf16, _, _ = _timed(pipe, runner, heldout, _preset_settings(name, "bf16"), warmup=warm and i == 0)
        fp8, _, _ = _timed(pipe, runner, heldout, _preset_settings(name, "fp8"), warmup=False)
        p_bf16, p_fp8 = _mean(_psnr(bf16, stock)), _mean(_psnr(fp8, stock))
        out["presets"][name] = {"psnr_bf16": p_bf16, "psnr_fp8": p_fp8, "delta_db": p_fp8 - p_bf16,
                                "within_0_5_db": p_bf16 - p_fp8 <= 0.5, "fp8_vs_bf16_psnr": _mean(_psnr(fp8, bf16))}
        print(f"fp8 {name}: {p_fp8:.2f} dB vs bf16 {p_bf16:.2f} dB", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="calibration,fp8", help="comma-separated: calibration, fp8")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="random-weight testbed, tiny sizes (plumbing check)")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="default: the pipeline's (5)")
    parser.add_argument("--target-psnr", type=float, default=30.0)
    parser.add_argument("--prompts", type=int, default=8, help="calibration prompts")
    parser.add_argument("--heldout", type=int, default=16, help="held-out evaluation prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-evals", type=int, default=12)
    parser.add_argument("--time-budget", type=float, default=None, help="seconds per calibration run")
    parser.add_argument("--timing-prompts", type=int, default=4)
    parser.add_argument("--budgets", type=float, nargs="*", default=None)
    parser.add_argument("--top-ps", type=float, nargs="*", default=None)
    parser.add_argument("--name", default="calibration_testbed", help="file name (no .json) of the calibration JSON")
    parser.add_argument("--fp8-name", default="fp8_testbed", help="file name (no .json) of the fp8 JSON")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.tiny:
        args.height, args.width, args.frames = 128, 128, 4
        args.steps, args.prompts, args.heldout, args.batch_size = 4, 2, 2, 2
        args.max_evals, args.timing_prompts, args.guidance = 3, 1, 1.0
        args.budgets, args.top_ps = args.budgets or [0.5], args.top_ps or [0.5]
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = _pipeline(args, device)
    call: dict[str, Any] = {"height": args.height, "width": args.width, "num_frames": args.frames}
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    from dit_accel.eval.harness import environment

    header = {"device": _device_name(device), "versions": environment(device)["versions"],
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv[1:] if argv is None else argv,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "size_note": ("CPU-size evidence (not the H200 target: 256x256 x 16 frames, 20 steps)"
                            if device.type == "cpu" else "the target size: 256x256 x 16 frames, 20 steps")}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"calibration", "fp8"})
    if unknown:
        parser.error(f"unknown sections {unknown}; allowed: calibration, fp8")
    if "calibration" in sections:
        data = dict(header, benchmark="calibration_testbed", target_psnr=args.target_psnr,
                    **calibration_section(args, pipe, device, call))
        path = args.out_dir / f"{args.name}.json"
        path.write_text(json.dumps(_clean(data), indent=1) + "\n")
        print(f"wrote {path}")
    if "fp8" in sections:
        data = dict(header, benchmark="fp8_testbed", **fp8_section(args, pipe, device, call))
        path = args.out_dir / f"{args.fp8_name}.json"
        path.write_text(json.dumps(_clean(data), indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _clean(value: Any) -> Any:
    """JSON-safe: infinite floats as strings, tuples as lists, dataclasses as dicts."""
    from dit_accel.preset_file import encode_floats

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return encode_floats(json.loads(json.dumps(value, default=str)))


if __name__ == "__main__":
    sys.exit(main())
